"""One typed config schema for TRASER: presets in configs/*.yaml, `key=value` overrides.

Unknown keys fail loudly and name the closest valid keys (MaxText style). Every
field has a default; a preset YAML sets only what differs.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class VisionConfig:
    """Qwen2.5-VL vision tower (defaults: the 3B model's)."""
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    out_hidden_size: int = 2048
    in_channels: int = 3
    rms_norm_eps: float = 1e-6


@dataclass
class TextConfig:
    """Qwen2.5 decoder (defaults: the 3B model's)."""
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 128000


@dataclass
class ResamplerConfig:
    """Idefics2-style perceiver resampler (OTR and TWR share these shapes)."""
    hidden_size: int = 2048
    depth: int = 3
    num_latents: int = 32
    num_heads: int = 16
    head_dim: int = 96
    num_kv_heads: int = 4
    intermediate_size: int = 8192  # 4 x hidden, as Idefics2's resampler MLP
    rms_norm_eps: float = 1e-6


@dataclass
class TokenConfig:
    """Token selection and trajectory arrangement (host side, numpy)."""
    coverage_threshold: float = 0.5
    fallback_step: float = 0.2
    fallback_tries: int = 2
    window_seconds: float = 4.0
    max_objects: int = 40
    max_tokens: int = 20000
    min_frames: int = 4
    max_frames: int = 128
    # Per-frame pixel budget of smart_resize: qwen-vl-utils' video defaults
    # (VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS), which the Qwen2.5-VL recipe feeds videos with.
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    # Special token ids of the Qwen2.5-VL tokenizer (+ the two TRASER tokens).
    vision_start_id: int = 151652
    vision_end_id: int = 151653
    video_token_id: int = 151656
    obj_traj_start_id: int = 151665
    obj_traj_end_id: int = 151666
    # Shape buckets of the packed inputs (tokens.pad_to_buckets), so jit sees few
    # shapes: each size pads to the next entry; past the last, to a multiple of it.
    bucket_selected: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, 32768, 65536])
    bucket_length: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 12288, 16384, 20480,
                                                              24576, 32768])
    bucket_objects: list[int] = field(default_factory=lambda: [8, 16, 24, 32, 40])
    bucket_windows: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024, 2048])
    # Training batches need one vision grid: frames resized to this [height, width]
    # (multiples of 28) and temporal grids padded up to a bucket. Empty frame_size:
    # the published smart_resize per video (then batches must share a size).
    frame_size: list[int] = field(default_factory=list)
    bucket_grid_t: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64])


@dataclass
class DataConfig:
    """Input pipeline: shards -> grain -> packed, bucketed batches."""
    train_dir: str = "runs/demo/data/train"
    eval_dir: str = "runs/demo/data/eval"
    tokenizer: str = ""  # a tokenizer.json; empty: train a small BPE on the training targets (toyworld)
    tokenizer_vocab_size: int = 2048
    prompt: str = "Output the Video Scene Graph from the video and object trajectories:"
    # Training task weights over the release's four prompts (traser_jax.tokenizer.PROMPTS): each
    # training video is given one task by a hash of its id; inference always asks for the scene graph.
    task_mix: dict[str, float] = field(default_factory=lambda: {"scene_graph": 1.0})
    global_batch_size: int = 8
    grad_accum_steps: int = 1
    worker_count: int = 2  # grain worker processes decoding frames in parallel
    cache_in_memory: bool = False  # featurize every video once and keep it (small datasets)
    # With cache_in_memory and the tower and merger frozen (optim.lr_vision = optim.lr_merger = 0): run
    # them once per video before training and feed their output tokens in place of the pixels.
    cache_vision_tokens: bool = False
    shuffle_seed: int = 0
    num_epochs: int = 0  # 0: repeat forever (steps bound the run)


@dataclass
class OptimConfig:
    """The published recipe: cosine with 1% warmup, wd 0.01, clip 1.0, per-group learning rates."""
    num_steps: int = 37000
    lr_llm: float = 2e-5
    lr_resampler: float = 1e-4
    lr_merger: float = 5e-5
    lr_vision: float = 0.0  # 0 freezes the vision tower (no optimizer state)
    warmup_ratio: float = 0.01
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    # AdamW's first moment: float32 (the recipe's) | bfloat16 (half its memory and traffic, as
    # MaxText's mu_dtype; the second moment stays float32).
    mu_dtype: str = "float32"


@dataclass
class MeshConfig:
    """Device mesh; -1 fills with the remaining devices. Rules map logical axis names to mesh axes."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: list[list[Any]] = field(default_factory=list)  # empty: traser_jax.sharding.DEFAULT_RULES


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    init_from: str = ""  # a converted checkpoint (`traser_jax.convert from-hf`) or a run directory; empty: random init
    seed: int = 0
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable | dots_and_attention_saveable
    # Where the float32 weights of the scanned layer stacks become compute_dtype: per_layer (each
    # layer's weights inside the layer loop, again in a remat recompute) | per_step (the whole stacks
    # once per step; their gradients come back stacked in compute_dtype). The same gradients to the bit,
    # but for a weight a layer uses twice (the resamplers' k/v projections): its two parts are summed
    # in compute_dtype (train.make_grad_fn; tests/test_train.py).
    weight_cast: str = "per_layer"
    # The layer loops (decoder, vision tower, resamplers) unrolled: the same parameters and results, no
    # loop, so XLA neither slices the weight stacks nor stacks remat residuals per layer (copies on
    # GPU), for a longer compile (5 to 7 times for traser_3b's decoder; modules.layers.scanned).
    unroll_layers: bool = False
    # Vision tower and decoder attention: einsum (any backend; the parity reference) | xla
    # (jax.nn.dot_product_attention) | cudnn (its fused kernel: NVIDIA GPUs, bf16/fp16 compute).
    attention_impl: str = "einsum"
    # The answer loss in chunks of this many positions, each chunk's logits recomputed in the backward:
    # its memory is chunk x vocab, not sequence x vocab (train.sequence_loss). 0: the whole sequence.
    loss_chunk: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    log_every: int = 10
    eval_every: int = 0
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.05
    # Constrained decoding refuses a relation (subject, predicate, object) a video's output already holds while
    # another object id is free for its subject and predicate (traser_jax.constrained, "no relation twice").
    # The release decodes without it.
    no_repeat_relations: bool = False


@dataclass
class Config:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _flat_keys(cls, prefix: str = "") -> dict[str, Any]:
    hints = get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_flat_keys(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


def valid_keys() -> list[str]:
    return sorted(_flat_keys(Config))


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=5, cutoff=0.5)
    hint = f"; closest valid keys: {', '.join(close)}" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _set(cfg: Config, dotted: str, value: Any) -> None:
    types = _flat_keys(Config)
    if dotted not in types:
        raise _unknown(dotted)
    *path, last = dotted.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, _coerce(value, types[dotted], dotted))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if isinstance(value, str) and typ is not str:  # a str field keeps its text (a prompt may end in ':')
        value = yaml.safe_load(value) if value != "" else value
    try:
        if typ is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typ in (int, float, str):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise TypeError
            return typ(value)
        return value  # lists and other structured values: taken as YAML gave them
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key {key!r}: cannot read {value!r} as {getattr(typ, '__name__', typ)}") from err


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in _flat_keys(Config):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load(preset: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """A preset (a name in configs/ or a YAML path) with `key=value` overrides."""
    path = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ConfigError(f"no config preset {str(preset)!r} (looked for {path})")
    cfg = Config(name=path.stem)
    for k, v in _flatten(yaml.safe_load(path.read_text()) or {}).items():
        _set(cfg, k, v)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any] | None) -> Config:
    """Set `key=value` strings or a {dotted key: value} dict on cfg, in place (and return it)."""
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in (overrides or [])]
    for k, v in items:
        _set(cfg, k, v)
    return cfg


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    k, v = item.split("=", 1)
    return k.strip(), v

"""Typed settings of the SVG2 generation pipeline, read from configs/svg2_generate.yaml.

Every field defaults to the released pipeline's setting (../shared/REFERENCE.md,
"SVG2 generation pipeline"); the YAML file spells the same values out for users.
Unknown keys fail loudly and name the closest valid ones; `key=value` overrides
(`--set` on the command line) use dotted paths, e.g. `sam2.image_size=256`.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "svg2_generate.yaml"


@dataclass
class DecodeConfig:
    fps: float | None = None  # keep about this many frames per second (None: every frame, native rate)
    max_frames: int | None = None  # only the first this many kept frames are the video (None: whole video)


@dataclass
class Sam2Config:
    config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"  # a config shipped inside the sam2 package
    checkpoint: str | None = None  # None: random weights (tests, benchmarks of compute cost)
    image_size: int = 1024  # model input side; a multiple of 32 (small values make CPU tests fast)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bfloat16: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    seed: int = 0  # torch seed before building, so random-weight models are the same everywhere


@dataclass
class ProposalConfig:
    frame_stride: int = 20  # automatic masks on every k-th frame
    point_grids: list[int] = field(default_factory=lambda: [32, 16, 4])  # points per side, per crop layer
    crop_n_layers: int = 2
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.75
    stability_score_thresh: float = 0.85
    box_nms_thresh: float = 0.7
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 0.5
    min_mask_region_area: int = 200  # holes and islands smaller than this are removed (pixels)
    use_m2m: bool = True
    max_covered: float = 0.9  # largest first: drop a mask whose area is already >= this covered


@dataclass
class TrackingConfig:
    check_every_samples: int | None = None  # None: total_frames // 100 + 1 proposal frames per check
    min_untracked: float = 0.05  # skip a check when the untracked region is under this fraction of the frame
    belongs: float = 0.9  # a proposal this much inside an existing track belongs to it
    new_object_untracked: float = 0.10  # an unmatched proposal with this fraction of its area untracked is new
    max_objects: int = 65
    offline_replay: bool = True  # reset, seed every object at its first frame, propagate once from frame 0


@dataclass
class CleanupConfig:
    contained: float = 0.9  # a track this much inside another on a frame is "contained" there
    contained_frames: float = 0.7  # ... on at least this fraction of co-occurring frames
    min_cooccurring: int = 5  # ... of at least this many co-occurring frames
    opening: int = 3  # side of the square structuring element of the morphological opening (0: off)
    min_area: int = 32  # masks under this many pixels are emptied


@dataclass
class RecordConfig:
    min_frames: int = 4  # sampled frames of the record: linspace(0, N-1, clip(round(seconds), min, max))
    max_frames: int = 128


@dataclass
class LLMConfig:
    base_url: str | None = None  # None: the openai client's default (or OPENAI_BASE_URL)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable only
    timeout_s: float = 120.0
    max_retries: int = 6  # on 429, 5xx and connection errors, with exponential backoff
    backoff_s: float = 1.0  # first wait; doubles each retry, with jitter
    backoff_max_s: float = 60.0
    format_retries: int = 2  # extra attempts when the reply is not valid JSON for the schema
    concurrency: int = 16  # in-flight requests per process (Ray: across the cluster)
    # USD per million tokens [input, output]; a model not listed costs 0 in the report.
    prices: dict[str, list[float]] = field(default_factory=lambda: {
        "gpt-4.1": [2.0, 8.0], "gpt-4.1-mini": [0.4, 1.6], "gpt-4o": [2.5, 10.0], "gpt-4o-mini": [0.15, 0.6]})


@dataclass
class DescribeConfig:
    describer: str = "auto"  # auto (DAM when its package imports, else openai) | dam | openai
    model: str = "gpt-4.1"  # the OpenAI-compatible vision model
    dam_model_path: str = "nvidia/DAM-3B-Video"
    max_objects: int = 40  # the largest objects are described (and kept in the record)
    frames_per_object: int = 8  # the frames where the object is most visible
    temperature: float = 0.2
    top_p: float = 0.5
    max_tokens: int = 512
    image_max_side: int = 448  # frames and focal crops are sent at most this large


@dataclass
class ParseConfig:
    model: str = "gpt-4.1-mini"
    temperature: float = 0.0
    max_tokens: int = 512


@dataclass
class RelationsConfig:
    model: str = "gpt-4.1"
    max_frames: int = 32  # frames shown (~1 fps, evenly thinned beyond this)
    image_max_side: int = 448
    temperature: float = 0.0
    max_tokens: int = 8192


@dataclass
class OutputConfig:
    format: str = "arrayrecord"  # arrayrecord | tfrecord
    records_per_shard: int = 32
    image_format: str = "jpeg"
    max_side: int = 448


@dataclass
class EngineConfig:
    kind: str = "inprocess"  # inprocess | ray
    address: str | None = None  # Ray cluster address (None: start a local instance)
    visual_actors: int | None = None  # SAM2 actors (None: one per GPU, or one on CPU)
    gpus_per_actor: float = 1.0  # ignored when the cluster has no GPU
    threads_per_actor: int = 2  # CPUs reserved by (and torch threads of) each SAM2 actor


@dataclass
class GenerateConfig:
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    sam2: Sam2Config = field(default_factory=Sam2Config)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    describe: DescribeConfig = field(default_factory=DescribeConfig)
    parse: ParseConfig = field(default_factory=ParseConfig)
    relations: RelationsConfig = field(default_factory=RelationsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """Short hash of the named sections: cache entries depend on exactly these settings."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ConfigError(ValueError):
    pass


def _leaf_types(cls, prefix: str = "") -> dict[str, Any]:
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_leaf_types(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


_TYPES = _leaf_types(GenerateConfig)


def _coerce(key: str, value: Any) -> Any:
    typ = _TYPES[key]
    base = {int: int, float: float, str: str, bool: bool}
    for t in (typ, *getattr(typ, "__args__", ())):
        if t is type(None) and value is None:
            return None
    for t in (typ, *getattr(typ, "__args__", ())):
        if t in base:
            if t is bool and not isinstance(value, bool):
                continue
            if t is int and isinstance(value, (bool, float)) and not float(value).is_integer():
                continue
            if t in (int, float) and not isinstance(value, (int, float)):
                continue
            return t(value)
        origin = getattr(t, "__origin__", None)
        if origin is list and isinstance(value, list):
            return value
        if origin is dict and isinstance(value, dict):
            return value
    raise ConfigError(f"config key {key!r}: cannot read {value!r} as {typ}")


def _set(cfg: GenerateConfig, key: str, value: Any) -> None:
    if key not in _TYPES:
        close = difflib.get_close_matches(key, sorted(_TYPES), n=4, cutoff=0.5)
        raise ConfigError(f"unknown config key {key!r}" + (f"; closest: {', '.join(close)}" if close else ""))
    *path, last = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, _coerce(key, value))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _TYPES:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> GenerateConfig:
    """Settings from a YAML file (default: configs/svg2_generate.yaml) plus `key=value` overrides."""
    cfg = GenerateConfig()
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    for k, v in _flatten(yaml.safe_load(path.read_text()) or {}).items():
        _set(cfg, k, v)
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for o in overrides or []:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not key=value")
            k, v = o.split("=", 1)
            items.append((k.strip(), yaml.safe_load(v) if v != "" else v))
    for k, v in items:
        _set(cfg, k, v)
    validate(cfg)
    return cfg


def validate(cfg: GenerateConfig) -> GenerateConfig:
    if cfg.sam2.image_size <= 0 or cfg.sam2.image_size % 32:
        raise ConfigError(f"sam2.image_size must be a positive multiple of 32, got {cfg.sam2.image_size}")
    if cfg.proposals.frame_stride < 1:
        raise ConfigError(f"proposals.frame_stride must be >= 1, got {cfg.proposals.frame_stride}")
    if len(cfg.proposals.point_grids) != cfg.proposals.crop_n_layers + 1:
        raise ConfigError(f"proposals.point_grids needs one grid per crop layer ({cfg.proposals.crop_n_layers + 1}), "
                          f"got {cfg.proposals.point_grids}")
    if cfg.describe.describer not in ("auto", "dam", "openai"):
        raise ConfigError(f"describe.describer must be auto, dam or openai, got {cfg.describe.describer!r}")
    if cfg.engine.kind not in ("inprocess", "ray"):
        raise ConfigError(f"engine.kind must be inprocess or ray, got {cfg.engine.kind!r}")
    if cfg.output.format not in ("arrayrecord", "tfrecord"):
        raise ConfigError(f"output.format must be arrayrecord or tfrecord, got {cfg.output.format!r}")
    if cfg.decode.fps is not None and cfg.decode.fps <= 0:
        raise ConfigError(f"decode.fps must be positive or null, got {cfg.decode.fps}")
    return cfg

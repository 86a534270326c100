"""PyTorch reference of the full TRASER forward: the parity target and the serving target.

The one module of traser_jax that imports torch. It is built on transformers'
`Qwen2_5_VLForConditionalGeneration` (its `model` and `lm_head` are attributes
here, so the state dict keeps Hugging Face names) and two
`Idefics2PerceiverResampler`s, `otr_resampler` and `twr_resampler`. The
safetensors layout of a TRASER checkpoint is therefore the Qwen2.5-VL keys
(`model.visual.*`, `model.language_model.*`, `lm_head.weight` unless tied) plus
`otr_resampler.*` and `twr_resampler.*`; `config.json` is the Qwen2.5-VL config
plus `resampler_config` (the Idefics2 perceiver config) and `traser_tokens`
(our TokenConfig). Checkpoints saved by transformers 4.x (`visual.*`,
`model.layers.*`) load too.

Token selection and arrangement are written here a second time, on purpose: a
plain per-object, per-window loop in torch, as the released code does it, sharing
no code with the packed numpy path of `traser_jax.tokens`; the tests check that
both give the same sequence and the same token sets.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

from traser_jax.config import Config, ResamplerConfig, TokenConfig
from traser_jax.tokens import DEFAULT_PROMPT, TokenFn, chat_texts

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# -- configs ------------------------------------------------------------------------

def qwen_config(cfg: Config) -> Qwen2_5_VLConfig:
    """Our config -> transformers' Qwen2.5-VL config (float32)."""
    v, t, k = cfg.vision, cfg.text, cfg.tokens
    half = t.hidden_size // t.num_heads // 2
    first = half // 4  # M-RoPE sections: [16, 24, 24] for head_dim 128; unused by 1-D positions
    mrope = [first, (half - first) // 2, half - first - (half - first) // 2]
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": mrope},
                tie_word_embeddings=t.tie_word_embeddings,
                # Qwen's <|endoftext|> / <|im_end|>; none in a tiny test vocabulary
                bos_token_id=151643 if t.vocab_size > 151643 else None,
                eos_token_id=151645 if t.vocab_size > 151645 else None)
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                  spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                  window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                  out_hidden_size=v.out_hidden_size, hidden_act="silu", tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, video_token_id=k.video_token_id,
                            vision_start_token_id=k.vision_start_id, vision_end_token_id=k.vision_end_id,
                            tie_word_embeddings=t.tie_word_embeddings, dtype="float32")


def perceiver_config(r: ResamplerConfig) -> Idefics2PerceiverConfig:
    if r.intermediate_size != 4 * r.hidden_size:
        raise ValueError(f"resampler.intermediate_size must be 4 x resampler.hidden_size={4 * r.hidden_size} "
                         f"(Idefics2's resampler MLP), got {r.intermediate_size}")
    return Idefics2PerceiverConfig(hidden_size=r.hidden_size, resampler_n_latents=r.num_latents,
                                   resampler_depth=r.depth, resampler_n_heads=r.num_heads,
                                   resampler_head_dim=r.head_dim, num_key_value_heads=r.num_kv_heads,
                                   rms_norm_eps=r.rms_norm_eps, hidden_act="silu")


def preprocess_frames(frames: np.ndarray, tokens: TokenConfig, patch_size: int = 14, temporal_patch_size: int = 2,
                      merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [T, H, W, 3] -> (pixel_values, video_grid_thw [1, 3]) by transformers' Qwen2-VL video processor.

    With `tokens.frame_size` set, frames are first resized to it by the processor's own resize
    (torchvision, bicubic, antialiased), then the processor's pixel bounds pin that size."""
    import torchvision.transforms.v2.functional as tvF
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    bounds = (tokens.min_pixels, tokens.max_pixels)
    if tokens.frame_size:
        height, width = (int(s) for s in tokens.frame_size)
        video = tvF.resize(video, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        bounds = (height * width, height * width)
    processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": bounds[0], "longest_edge": bounds[1]}, patch_size=patch_size,
        temporal_patch_size=temporal_patch_size, merge_size=merge_size, cap_pixels_per_frame=False)
    out = processor(videos=[video], return_tensors="pt", do_sample_frames=False)
    return out["pixel_values_videos"], out["video_grid_thw"]


# -- selection and arrangement, the released way ---------------------------------------

@dataclass
class ReferenceArrangement:
    input_ids: list[int]
    object_ids: list[int]  # kept objects in block order
    object_tokens: list[list[int]]  # per block: the object's merged tokens (OTR context)
    windows: list[tuple[int, int, list[int]]]  # (block, window on the timeline, tokens): TWR contexts, sequence order


def _box_coverage(masks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[T, H, W] masks -> [T, rows, cols] mean of the mask over each cell, by an integral image.

    The integral of a pixel-constant image is bilinear inside each pixel, so the
    integral up to a fractional corner is a bilinear lookup into the summed-area table."""
    t, h, w = masks.shape
    table = torch.zeros(t, h + 1, w + 1, dtype=torch.float64)
    table[:, 1:, 1:] = (masks != 0).double().cumsum(1).cumsum(2)

    def lookup(x: torch.Tensor, axis: int, size: int, cells: int) -> torch.Tensor:
        pos = torch.arange(cells + 1, dtype=torch.float64) * size / cells
        lo = pos.floor().long().clamp(max=size - 1)
        frac = pos - lo
        shape = [1, 1, 1]
        shape[axis] = -1
        return (x.index_select(axis, lo) * (1 - frac).view(shape) + x.index_select(axis, lo + 1) * frac.view(shape))

    corners = lookup(lookup(table, 1, h, rows), 2, w, cols)
    box = corners[:, 1:, 1:] - corners[:, :-1, 1:] - corners[:, 1:, :-1] + corners[:, :-1, :-1]
    return box / ((h / rows) * (w / cols))


class TraserReference(nn.Module):
    def __init__(self, qwen: Qwen2_5_VLConfig, perceiver: Idefics2PerceiverConfig, tokens: TokenConfig,
                 attn_implementation: str = "eager"):
        super().__init__()
        hf = Qwen2_5_VLForConditionalGeneration._from_config(qwen, attn_implementation=attn_implementation,
                                                             dtype=torch.float32)
        self.config = hf.config
        self.model = hf.model  # model.visual, model.language_model: Hugging Face names
        self.lm_head = hf.lm_head  # tied to the embeddings when the config says so
        self.otr_resampler = Idefics2PerceiverResampler._from_config(
            perceiver, attn_implementation=attn_implementation, dtype=torch.float32)
        self.twr_resampler = Idefics2PerceiverResampler._from_config(
            perceiver, attn_implementation=attn_implementation, dtype=torch.float32)
        self.perceiver_config = perceiver
        self.tokens = tokens
        if perceiver.hidden_size != qwen.text_config.hidden_size:
            raise ValueError(f"resampler hidden_size {perceiver.hidden_size} != LLM hidden_size "
                             f"{qwen.text_config.hidden_size}")

    @classmethod
    def from_config(cls, cfg: Config, attn_implementation: str = "eager") -> "TraserReference":
        return cls(qwen_config(cfg), perceiver_config(cfg.resampler), dataclasses.replace(cfg.tokens),
                   attn_implementation)

    # -- arrangement ------------------------------------------------------------------
    def arrange(self, masks, grid_thw, token_fn: TokenFn, prompt: str = DEFAULT_PROMPT,
                seconds_per_frame: float = 1.0, object_ids: Sequence[int] | None = None,
                target_ids: Sequence[int] = ()) -> ReferenceArrangement:
        """masks [K, T, H, W] (any resolution) + the video's grid_thw -> the TRASER input sequence."""
        k = self.tokens
        masks = torch.as_tensor(np.asarray(masks))
        grid_t, grid_h, grid_w = (int(x) for x in torch.as_tensor(grid_thw).reshape(-1)[:3])
        merge = self.config.vision_config.spatial_merge_size
        tps = self.config.vision_config.temporal_patch_size
        rows, cols = grid_h // merge, grid_w // merge
        ids = list(range(masks.shape[0])) if object_ids is None else [int(i) for i in object_ids]

        kept_ids, kept_tokens = [], []
        for oid, m in zip(ids, masks):
            if len(kept_ids) == k.max_objects:
                break
            if not bool(m.any()):
                continue  # empty on every sampled frame
            cov = torch.stack([_box_coverage(frame[None], rows, cols)[0] for frame in m])  # frame by frame: memory
            cov = torch.cat([cov, cov[-1:].expand(grid_t * tps - cov.shape[0], -1, -1)])
            cov = torch.round(cov.view(grid_t, tps, rows, cols).amax(1), decimals=9).flatten()
            chosen, threshold = None, k.coverage_threshold
            for _ in range(k.fallback_tries + 1):
                hits = torch.nonzero((cov >= round(threshold, 9)) & (cov > 0)).flatten()
                if len(hits):
                    chosen = hits.tolist()
                    break
                threshold -= k.fallback_step
            kept_ids.append(oid)
            kept_tokens.append(chosen if chosen is not None else [int(torch.argmax(cov))])

        seconds_per_grid = tps * seconds_per_frame
        grids_per_window = max(1, math.floor(k.window_seconds / seconds_per_grid + 0.5))
        span = grids_per_window * seconds_per_grid
        per_window = rows * cols * grids_per_window
        blocks, windows, used = [], [], 0
        for slot, toks in enumerate(kept_tokens):
            block = [k.obj_traj_start_id, *token_fn(f"Object {slot + 1}: "), k.vision_start_id]
            block += [k.video_token_id] * self.perceiver_config.resampler_n_latents
            block_windows = []
            for w in range(grid_t // grids_per_window + 1):
                in_window = [tok for tok in toks if tok // per_window == w]
                if not in_window:
                    continue
                label = f"<{math.floor(w * span + 0.5)} - {math.floor((w + 1) * span + 0.5)} sec>"
                block += [*token_fn(label), *[k.video_token_id] * self.perceiver_config.resampler_n_latents]
                block_windows.append((slot, w, in_window))
            block += [k.vision_end_id, k.obj_traj_end_id]
            if used + len(block) > k.max_tokens:
                if not blocks:
                    raise ValueError(f"tokens.max_tokens={k.max_tokens} is smaller than the first object's block")
                break
            used += len(block)
            blocks.append(block)
            windows += block_windows
        prefix, suffix = chat_texts(prompt)
        input_ids = [*token_fn(prefix), *(i for b in blocks for i in b), *token_fn(suffix), *target_ids]
        return ReferenceArrangement(input_ids, kept_ids[:len(blocks)], kept_tokens[:len(blocks)], windows)

    # -- forward ----------------------------------------------------------------------
    @staticmethod
    def _resample(resampler: Idefics2PerceiverResampler, contexts: list[torch.Tensor]) -> torch.Tensor:
        """One padded batch, padding masked out, as the released code runs the resamplers."""
        n, d = resampler.n_latents, resampler.hidden_size
        if not contexts:
            return torch.zeros(0, n, d, dtype=resampler.latents.dtype)
        longest = max(c.shape[0] for c in contexts)
        batch = torch.zeros(len(contexts), longest, d, dtype=contexts[0].dtype)
        mask = torch.zeros(len(contexts), longest, dtype=torch.long)
        for i, c in enumerate(contexts):
            batch[i, :c.shape[0]] = c
            mask[i, :c.shape[0]] = 1
        return resampler(context=batch, attention_mask=mask)

    def vision_tokens(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged vision tokens [M, D] of the video(s), in the processor's order."""
        return self.model.visual(pixel_values.to(self.lm_head.weight.dtype), grid_thw=grid_thw).pooler_output

    def embed(self, vision: torch.Tensor, arrangement: ReferenceArrangement):
        """-> (inputs_embeds [1, L, D], OTR outputs [K, n, D], TWR outputs [W, n, D])."""
        otr = self._resample(self.otr_resampler, [vision[t] for t in arrangement.object_tokens])
        twr = self._resample(self.twr_resampler, [vision[t] for _, _, t in arrangement.windows])
        rows = []  # latents in sequence order: per object its OTR latents, then its windows' TWR latents
        for slot in range(len(arrangement.object_tokens)):
            rows.append(otr[slot])
            rows += [twr[i] for i, (s, _, _) in enumerate(arrangement.windows) if s == slot]
        ids = torch.tensor([arrangement.input_ids])
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.tokens.video_token_id).unsqueeze(-1).expand_as(embeds)
        if rows:
            embeds = embeds.masked_scatter(slots, torch.cat(rows).to(embeds.dtype))
        return embeds, otr, twr

    def language_model(self, inputs_embeds=None, input_ids=None, start: int = 0, cache=None):
        """Logits with plain 1-D positions start.. (the same on the three M-RoPE axes)."""
        length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        positions = torch.arange(start, start + length).view(1, 1, -1).expand(3, 1, -1)
        out = self.model.language_model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=positions,
                                        cache=cache, use_cache=cache is not None)
        return self.lm_head(out.last_hidden_state), out.cache

    def forward_arranged(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                         arrangement: ReferenceArrangement) -> "ReferenceOutput":
        vision = self.vision_tokens(pixel_values, grid_thw)
        embeds, otr, twr = self.embed(vision, arrangement)
        logits, _ = self.language_model(inputs_embeds=embeds)
        return ReferenceOutput(arrangement, pixel_values, grid_thw, vision, otr, twr, embeds[0], logits[0])

    def forward(self, frames: np.ndarray, masks, token_fn: TokenFn, prompt: str = DEFAULT_PROMPT,
                seconds_per_frame: float = 1.0, object_ids: Sequence[int] | None = None,
                target_ids: Sequence[int] = ()) -> "ReferenceOutput":
        """uint8 frames [T, H, W, 3], masks [K, T, H, W] and a prompt -> logits [L, vocab] (and what led there)."""
        v = self.config.vision_config
        pixel_values, grid_thw = preprocess_frames(frames, self.tokens, v.patch_size, v.temporal_patch_size,
                                                   v.spatial_merge_size)
        arrangement = self.arrange(masks, grid_thw, token_fn, prompt, seconds_per_frame, object_ids, target_ids)
        return self.forward_arranged(pixel_values, grid_thw, arrangement)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, arrangement: ReferenceArrangement,
                 max_new_tokens: int = 8192, eos_token_ids: Sequence[int] = (151645, 151643),
                 repetition_penalty: float = 1.05) -> list[int]:
        """Greedy decoding with a KV cache and transformers' repetition penalty over prompt + output ids."""
        from transformers.cache_utils import DynamicCache

        vision = self.vision_tokens(pixel_values, grid_thw)
        embeds, _, _ = self.embed(vision, arrangement)
        cache = DynamicCache(config=self.config.text_config)
        logits, cache = self.language_model(inputs_embeds=embeds, cache=cache)
        seen, out, length = list(arrangement.input_ids), [], embeds.shape[1]
        for step in range(max_new_tokens):
            scores = logits[0, -1].float()
            if repetition_penalty != 1.0:
                idx = torch.tensor(sorted(set(seen)))
                s = scores[idx]
                scores[idx] = torch.where(s < 0, s * repetition_penalty, s / repetition_penalty)
            token = int(torch.argmax(scores))
            out.append(token)
            seen.append(token)
            if token in eos_token_ids:
                break
            logits, cache = self.language_model(input_ids=torch.tensor([[token]]), start=length + step, cache=cache)
        return out

    # -- checkpoints --------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 5 * 1024 ** 3) -> None:
        """config.json + model.safetensors (sharded with an index past max_shard_bytes)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # shared with the embeddings, as transformers saves it
        shards, current, size = [], {}, 0
        for name in sorted(state):
            nbytes = state[name].numel() * state[name].element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = state[name]
            size += nbytes
        shards.append(current)
        for old in list(directory.glob("model*.safetensors")) + [directory / INDEX_NAME]:
            old.unlink(missing_ok=True)
        if len(shards) == 1:
            save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(directory / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                            "weight_map": weight_map}, indent=1))
        config = self.config.to_dict()
        config["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
        config["resampler_config"] = self.perceiver_config.to_dict()
        config["traser_tokens"] = dataclasses.asdict(self.tokens)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1, sort_keys=True))

    @classmethod
    def from_pretrained(cls, directory: str | Path, resampler: ResamplerConfig | None = None,
                        attn_implementation: str = "eager") -> "TraserReference":
        """A TRASER directory (or a plain Qwen2.5-VL one, given `resampler`: its resamplers stay random)."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        perceiver = config.pop("resampler_config", None)
        token_fields = config.pop("traser_tokens", None)
        plain_qwen = perceiver is None
        if perceiver is not None:
            perceiver = Idefics2PerceiverConfig(**{k: v for k, v in perceiver.items()
                                                   if k in Idefics2PerceiverConfig.__dataclass_fields__})
        elif resampler is not None:
            perceiver = perceiver_config(resampler)
        else:
            raise ValueError(f"{directory / CONFIG_NAME} has no resampler_config (not a TRASER checkpoint); "
                             "pass resampler=ResamplerConfig(...) to start the resamplers from random weights")
        tokens = TokenConfig(**token_fields) if token_fields is not None else TokenConfig()
        model = cls(Qwen2_5_VLConfig.from_dict(config), perceiver, tokens, attn_implementation)
        state = {_hf_name(name): t for name, t in read_safetensors(directory).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if plain_qwen:
            allowed |= {n for n in missing if n.startswith(("otr_resampler.", "twr_resampler."))}
        if unexpected or set(missing) - allowed:
            raise ValueError(f"checkpoint {directory} does not match the model: missing "
                             f"{sorted(set(missing) - allowed)[:8]}, unexpected {sorted(unexpected)[:8]}")
        return model.eval()


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, sharded (with an index) or not."""
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        index = json.loads((directory / INDEX_NAME).read_text())
        state = {}
        for fname in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(directory / fname)))
        return state
    if (directory / WEIGHTS_NAME).exists():
        return load_file(str(directory / WEIGHTS_NAME))
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def _hf_name(name: str) -> str:
    """transformers 4.x Qwen2.5-VL names (visual.*, model.layers.*) -> the 5.x ones used here."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model."):]
    return name


@dataclass
class ReferenceOutput:
    arrangement: ReferenceArrangement
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    vision: torch.Tensor  # [M, D] merged vision tokens
    otr: torch.Tensor  # [K, n, D]
    twr: torch.Tensor  # [W, n, D], sequence order
    inputs_embeds: torch.Tensor  # [L, D]
    logits: torch.Tensor  # [L, vocab]

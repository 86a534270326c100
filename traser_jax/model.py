"""The full TRASER forward in Flax Linen, and `--summary` (parameter counts without allocating).

    vision tower (pixels -> merged tokens [M, D], HF order)
      -> gather the selected tokens `sel_token` [N]            (a token may repeat: one copy per object)
      -> OTR over `otr_segment` [N] -> [K, n_lat, D]          (one segment per object)
      -> TWR over `twr_segment` [N] -> [W, n_lat, D]          (one segment per (object, window))
      -> rows = concat(OTR.reshape(K * n_lat, D), TWR.reshape(W * n_lat, D))
      -> text embeddings of `input_ids` [B, L]; where `latent_index` >= 0 the row
         rows[latent_index] replaces the embedding (latent slots carry the video token id)
      -> Qwen2.5 decoder with the 1-D `positions` and `attention_mask` -> logits [B, L, vocab]

Inputs are traser_jax.tokens.TraserInputs: one video unbatched ([N], [L]) or a batch
from `tokens.stack` ([B, N], [B, L]). The vision tower runs once over the videos'
patches concatenated (static `grid_thw`, one (t, h, w) per video) and `sel_token`
indexes the concatenation; segment ids and `latent_index` rows are per video. The
resamplers run per video side by side ([B, S, ...]). `num_objects` (K) and
`num_windows` (W) are static: the padded sizes (shape buckets) of the batch.

Parameter tree (top level): `vision` (incl. `vision/merger`), `otr_resampler`,
`twr_resampler`, `llm`. Stacked layers sit on a leading `layers` axis.

    python -m traser_jax.model --config configs/traser_3b.yaml --summary
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import traverse_util

from traser_jax import config as config_lib
from traser_jax import sharding as sh
from traser_jax.config import Config
from traser_jax.modules.layers import ATTENTION_IMPLS, dtype_of
from traser_jax.modules.resampler import PerceiverResampler
from traser_jax.modules.text import Cache, TextDecoder, init_cache  # noqa: F401 (re-exported for decoding)
from traser_jax.modules.vision import VisionTower

Grids = tuple[tuple[int, int, int], ...]
WEIGHT_CASTS = ("per_layer", "per_step")  # train.weight_cast (train.cast_layer_stacks)


def check_shapes(cfg: Config) -> None:
    """The widths that must agree between the towers and the attention implementation, checked before
    anything is built, with the field names in the error."""
    widths = {"vision.out_hidden_size": cfg.vision.out_hidden_size, "text.hidden_size": cfg.text.hidden_size,
              "resampler.hidden_size": cfg.resampler.hidden_size}
    if len(set(widths.values())) != 1:
        raise config_lib.ConfigError(f"model widths must agree: {widths}")
    if cfg.vision.hidden_size % cfg.vision.num_heads:
        raise config_lib.ConfigError(f"vision.hidden_size {cfg.vision.hidden_size} is not a multiple of "
                                     f"vision.num_heads {cfg.vision.num_heads}")
    if cfg.train.attention_impl not in ATTENTION_IMPLS:
        raise config_lib.ConfigError(f"train.attention_impl {cfg.train.attention_impl!r}: expected one of "
                                     f"{', '.join(ATTENTION_IMPLS)}")
    if cfg.train.weight_cast not in WEIGHT_CASTS:
        raise config_lib.ConfigError(f"train.weight_cast {cfg.train.weight_cast!r}: expected one of "
                                     f"{', '.join(WEIGHT_CASTS)}")
    if cfg.train.attention_impl == "cudnn" and cfg.train.compute_dtype not in ("bfloat16", "float16"):
        raise config_lib.ConfigError(f"train.attention_impl cudnn needs train.compute_dtype bfloat16 or "
                                     f"float16 (cuDNN's fused attention), not {cfg.train.compute_dtype!r}")
    # An id past the table would be looked up as NaN (jnp.take fills out-of-range rows), not refused.
    special = {f"tokens.{name}": getattr(cfg.tokens, name) for name in
               ("vision_start_id", "vision_end_id", "video_token_id", "obj_traj_start_id", "obj_traj_end_id")}
    outside = {name: i for name, i in special.items() if not 0 <= i < cfg.text.vocab_size}
    if outside:
        raise config_lib.ConfigError(f"special token ids {outside} lie outside text.vocab_size "
                                     f"{cfg.text.vocab_size}")


def _batched(x: jax.Array) -> jax.Array:
    """One video's [N] / [L] arrays as a batch of one."""
    return x[None] if x.ndim == 1 else x


class Traser(nn.Module):
    cfg: Config

    def setup(self):
        cfg = self.cfg
        check_shapes(cfg)
        kw = dict(dtype=dtype_of(cfg.train.compute_dtype), param_dtype=dtype_of(cfg.train.param_dtype),
                  remat=cfg.train.remat, unroll_layers=cfg.train.unroll_layers)
        self.vision = VisionTower(cfg.vision, attention_impl=cfg.train.attention_impl, **kw)
        self.otr_resampler = PerceiverResampler(cfg.resampler, **kw)
        self.twr_resampler = PerceiverResampler(cfg.resampler, **kw)
        self.llm = TextDecoder(cfg.text, attention_impl=cfg.train.attention_impl, **kw)

    def encode_video(self, pixel_values: jax.Array, grid_thw: Grids) -> jax.Array:
        """Merged vision tokens [M, D] of the concatenated videos, HF order."""
        return self.vision(pixel_values, grid_thw)

    def resample(self, video_tokens: jax.Array, sel_token: jax.Array, otr_segment: jax.Array,
                 twr_segment: jax.Array, num_objects: int, num_windows: int, return_attention: bool = False):
        """Latent rows [B, (K + W) * n_lat, D] per video: its OTR blocks 0..K-1, then its TWR blocks 0..W-1.

        sel_token, otr_segment, twr_segment: [B, N] (or [N] for one video); segments numbered per video,
        -1 = padding. With return_attention also {"otr", "twr"} weights [depth, B, S, heads, n_lat, N + n_lat]."""
        sel_token, otr_segment, twr_segment = (_batched(a) for a in (sel_token, otr_segment, twr_segment))
        context = video_tokens[jnp.maximum(sel_token, 0)]  # [B, N, D]
        otr_segment = jnp.where(sel_token >= 0, otr_segment, -1)
        twr_segment = jnp.where(sel_token >= 0, twr_segment, -1)
        otr = self.otr_resampler(context, otr_segment, num_objects, return_attention=return_attention)
        twr = self.twr_resampler(context, twr_segment, num_windows, return_attention=return_attention)
        weights = None
        if return_attention:
            (otr, w_otr), (twr, w_twr) = otr, twr
            weights = {"otr": w_otr, "twr": w_twr}
        batch, width = context.shape[0], context.shape[-1]
        rows = jnp.concatenate([otr.reshape(batch, -1, width), twr.reshape(batch, -1, width)], axis=1)
        return (rows, weights) if return_attention else rows

    def embed_inputs(self, pixel_values, grid_thw: Grids, sel_token, otr_segment, twr_segment, input_ids,
                     latent_index, num_objects: int, num_windows: int) -> jax.Array:
        """Decoder input embeddings [B, L, D]: text embeddings with the latent slots filled."""
        return self.embed_video_tokens(self.encode_video(pixel_values, grid_thw), sel_token, otr_segment,
                                       twr_segment, input_ids, latent_index, num_objects, num_windows)

    def embed_video_tokens(self, video_tokens, sel_token, otr_segment, twr_segment, input_ids, latent_index,
                           num_objects: int, num_windows: int) -> jax.Array:
        """`embed_inputs` from the tower's output tokens (`encode_video`'s, e.g. cached)."""
        rows = self.resample(video_tokens, sel_token, otr_segment, twr_segment, num_objects, num_windows)
        input_ids, latent_index = _batched(input_ids), _batched(latent_index)
        embeds = self.llm.embed(input_ids)
        filled = jnp.take_along_axis(rows, jnp.maximum(latent_index, 0)[..., None], axis=1).astype(embeds.dtype)
        return jnp.where((latent_index >= 0)[..., None], filled, embeds)

    def decode(self, embeds, positions, attention_mask, cache: Cache | None = None, cache_index=None,
               return_hidden: bool = False):
        """The decoder on given embeddings: (logits or hidden [B, S, ...], new cache or None)."""
        return self.llm(embeds, positions, attention_mask, cache=cache, cache_index=cache_index,
                        return_hidden=return_hidden)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return self.llm.embed(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.llm.logits(hidden)

    def __call__(self, pixel_values, grid_thw: Grids, sel_token, otr_segment, twr_segment, input_ids,
                 latent_index, positions, attention_mask, num_objects: int, num_windows: int,
                 return_hidden: bool = False) -> jax.Array:
        """Logits [B, L, vocab] (float32), or the final hidden states with return_hidden.

        The arrays are traser_jax.tokens.TraserInputs' ([B, ...] after `stack`, or one video's unbatched);
        num_objects / num_windows = the padded K / W (object_ids.shape[-1], window_object.shape[-1])."""
        embeds = self.embed_inputs(pixel_values, grid_thw, sel_token, otr_segment, twr_segment, input_ids,
                                   latent_index, num_objects, num_windows)
        out, _ = self.decode(embeds, _batched(positions), _batched(attention_mask), return_hidden=return_hidden)
        return out


def embed_batch(model: Traser, params: dict, batch: dict[str, jax.Array], statics) -> jax.Array:
    """Decoder input embeddings [B, L, D] of a collated batch (traser_jax.data.collate): per video,
    vmapped, the vision tower on its own patches (or its cached output tokens) and both resamplers
    fill the latent slots.

    statics = (vision grid (t, h, w), object slots K, window slots W). Inside the vmap a video's
    own batch axis is 1, so the vmapped axis carries the batch sharding (data, fsdp)."""
    grid, k, w = statics
    cached = "video_tokens" in batch  # the frozen tower's output (data.cache_vision_tokens)

    def one(video, sel_token, otr_segment, twr_segment, input_ids, latent_index):
        if cached:
            return model.apply({"params": params}, video, sel_token, otr_segment, twr_segment, input_ids[None],
                               latent_index[None], k, w, method=Traser.embed_video_tokens)[0]
        return model.apply({"params": params}, video, (grid,), sel_token, otr_segment, twr_segment,
                           input_ids[None], latent_index[None], k, w, method=Traser.embed_inputs)[0]

    rules = [(name, None if name == sh.ACT_BATCH else axes) for name, axes in nn.get_logical_axis_rules()]
    with nn.logical_axis_rules(rules):
        return jax.vmap(one, spmd_axis_name=sh.BATCH_MESH_AXES)(
            batch["video_tokens" if cached else "pixel_values"], batch["sel_token"], batch["otr_segment"],
            batch["twr_segment"], batch["input_ids"], batch["latent_index"])


def example_inputs(cfg: Config, grid: tuple[int, int, int] | None = None, num_tokens: int = 4,
                   length: int = 8, num_objects: int = 1, num_windows: int = 1) -> dict[str, Any]:
    """Small well-formed inputs (for init and shape evaluation); statics included. The default grid is
    one merged cell: (1, spatial_merge_size, spatial_merge_size)."""
    merge = cfg.vision.spatial_merge_size
    grid = grid or (1, merge, merge)
    t, h, w = grid
    patch_dim = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
    merged = t * h * w // cfg.vision.spatial_merge_size ** 2
    n_lat = cfg.resampler.num_latents
    latent_index = np.full((1, length), -1, np.int32)
    latent_index[0, :min(length, (num_objects + num_windows) * n_lat)] = np.arange(
        min(length, (num_objects + num_windows) * n_lat))
    return dict(
        pixel_values=jnp.zeros((t * h * w, patch_dim), jnp.float32), grid_thw=(grid,),
        sel_token=jnp.arange(num_tokens, dtype=jnp.int32) % merged,
        otr_segment=jnp.zeros((num_tokens,), jnp.int32), twr_segment=jnp.zeros((num_tokens,), jnp.int32),
        input_ids=jnp.zeros((1, length), jnp.int32), latent_index=jnp.asarray(latent_index),
        positions=jnp.arange(length, dtype=jnp.int32)[None], attention_mask=jnp.ones((1, length), jnp.int32),
        num_objects=num_objects, num_windows=num_windows)


def init_params(cfg: Config, rng: jax.Array, boxed: bool = False) -> dict:
    """Random parameters (HF's init: normal(0.02) kernels, zero biases, unit norms)."""
    inputs = example_inputs(cfg)
    statics = {k: inputs.pop(k) for k in ("grid_thw", "num_objects", "num_windows")}
    variables = jax.jit(lambda r, x: Traser(cfg).init(r, **x, **statics))(rng, inputs)
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


def init_resamplers(cfg: Config, rng: jax.Array) -> dict:
    """Fresh {'otr_resampler', 'twr_resampler'} params alone (for a Qwen2.5-VL checkpoint without them)."""
    module = PerceiverResampler(cfg.resampler, param_dtype=dtype_of(cfg.train.param_dtype))
    context = jnp.zeros((1, cfg.resampler.hidden_size), jnp.float32)
    segment = jnp.zeros((1,), jnp.int32)
    init = jax.jit(lambda r: nn.meta.unbox(module.init(r, context, segment, 1)["params"]))
    otr_rng, twr_rng = jax.random.split(rng)
    return {"otr_resampler": init(otr_rng), "twr_resampler": init(twr_rng)}


_ABSTRACT_CACHE: dict[str, dict] = {}


def abstract_params(cfg: Config, boxed: bool = True) -> dict:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct, with logical-axis boxes), nothing allocated."""
    key = yaml.safe_dump(cfg.to_dict())
    if key not in _ABSTRACT_CACHE:  # tracing the whole model takes seconds; converters ask often
        inputs = example_inputs(cfg)
        statics = {k: inputs.pop(k) for k in ("grid_thw", "num_objects", "num_windows")}
        _ABSTRACT_CACHE[key] = jax.eval_shape(lambda r, x: Traser(cfg).init(r, **x, **statics),
                                              jax.random.key(0), inputs)["params"]
    params = _ABSTRACT_CACHE[key]
    return params if boxed else nn.meta.unbox(params)


def shape_mismatch(want: dict, got: dict) -> tuple[str, tuple | None, tuple | None] | None:
    """The first parameter, by sorted path, whose shape differs between two nested trees (None where a
    tree lacks it): (its '/'-joined path, the shape in `got`, the shape in `want`); None if all agree."""
    want, got = traverse_util.flatten_dict(want), traverse_util.flatten_dict(got)
    for key in sorted(set(want) | set(got)):
        shape_want = tuple(want[key].shape) if key in want else None
        shape_got = tuple(got[key].shape) if key in got else None
        if shape_want != shape_got:
            return "/".join(key), shape_got, shape_want
    return None


def param_counts(cfg: Config) -> dict[str, int]:
    """{'total', 'vision', 'llm', 'resamplers'} from shapes only (tied lm_head counted once, as HF)."""
    flat = traverse_util.flatten_dict(abstract_params(cfg, boxed=False))
    counts = {"vision": 0, "llm": 0, "resamplers": 0}
    for path, leaf in flat.items():
        group = "resamplers" if path[0].endswith("resampler") else path[0]
        counts[group] += int(np.prod(leaf.shape))
    counts["total"] = sum(counts.values())
    return {k: counts[k] for k in ("total", "vision", "llm", "resamplers")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traser_jax.model", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a preset name in configs/ or a YAML path")
    parser.add_argument("--summary", action="store_true", help="print JSON parameter counts (no allocation)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = config_lib.load(args.config, args.overrides)
    if not args.summary:
        parser.error("nothing to do: pass --summary")
    print(json.dumps(param_counts(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

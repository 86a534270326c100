"""The Qwen2.5-VL vision tower in Flax Linen, numerically equal to HF's
Qwen2_5_VisionTransformerPretrainedModel.

Input is HF's layout: `pixel_values [num_patches, C * T * P * P]` (T = temporal
patch 2, P = 14; patches of each 2x2 merge block consecutive, see
Qwen2VLVideoProcessor) and the static grids `((t, h, w), ...)` in patches, one per
video. Output: merged tokens `[num_patches / 4, out_hidden_size]` in HF order
(video, temporal grid, row, column of the 28x28 cells).

Inside, as HF: tokens are permuted once into window order (the 2x2 merge units of
each `window_size`-pixel window contiguous); window-attention blocks attend within
a window, full-attention blocks (`fullatt_block_indexes`) within one temporal grid
(a frame pair); the merger runs in window order and its output is permuted back.
Windows at the right/bottom edge are smaller: each attention group is gathered into
a padded [groups, group_len] block with its padding masked, so shapes are static
for a given grid (the grid is a static argument: one compilation per grid bucket).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from traser_jax import sharding as sh
from traser_jax.config import VisionConfig
from traser_jax.modules.layers import (Dtype, GatedMLP, RMSNorm, apply_rope, attention, dense, normal_init,
                                       rope_inv_freq, scanned)

VISION_ROPE_THETA = 10000.0  # HF Qwen2.5-VL vision rotary base ("axial" rope)
VISION_NORM_EPS = 1e-6       # HF hard-codes eps 1e-6 in the vision blocks and the merger

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class VisionLayout:
    """Static index plans for one tuple of grids (all numpy, built once per grid)."""
    window_index: np.ndarray    # [units] merge units in window order (unit = merge x merge patches)
    reverse_index: np.ndarray   # [units] window order -> HF order
    positions: np.ndarray       # [patches, 2] (row, col) of each patch, window order
    window_groups: np.ndarray   # [windows, win_len] patch indices (window order), -1 = padding
    window_inverse: np.ndarray  # [patches] flat index into window_groups of each patch
    frame_groups: np.ndarray    # [frames, frame_len] (frame = one temporal grid of one video)
    frame_inverse: np.ndarray


def _groups(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive ranges of the given lengths as a padded [G, Lmax] index block + inverse."""
    width = max(lengths)
    groups = np.full((len(lengths), width), -1, np.int32)
    inverse = np.empty(sum(lengths), np.int32)
    start = 0
    for g, n in enumerate(lengths):
        groups[g, :n] = np.arange(start, start + n)
        inverse[start:start + n] = g * width + np.arange(n)
        start += n
    return groups, inverse


@functools.lru_cache(maxsize=64)
def vision_layout(grids: tuple[Grid, ...], spatial_merge: int, window_size: int, patch_size: int) -> VisionLayout:
    if not grids:
        raise ValueError("vision_layout: no grids")
    m = spatial_merge
    unit = m * m
    win = window_size // spatial_merge // patch_size  # window side in merged cells
    if win < 1:
        raise ValueError(f"window_size {window_size} is smaller than one merged cell ({m * patch_size} px)")
    window_units, unit_positions, window_lens, frame_lens = [], [], [], []
    offset = 0
    for i, (t, h, w) in enumerate(grids):
        if t < 1 or h % m or w % m or h < m or w < m:
            raise ValueError(f"grid {i} = {(t, h, w)}: need t >= 1 and h, w positive multiples of "
                             f"spatial_merge_size {m}")
        gh, gw = h // m, w // m
        cells = np.arange(t * gh * gw).reshape(t, gh, gw) + offset
        for f in range(t):
            for r0 in range(0, gh, win):
                for c0 in range(0, gw, win):
                    block = cells[f, r0:r0 + win, c0:c0 + win].reshape(-1)
                    window_units.append(block)
                    window_lens.append(block.size * unit)
            frame_lens.append(gh * gw * unit)
        # (row, col) of each patch in HF order: merge blocks in raster order, patches inside a block raster
        rows = (np.arange(gh)[:, None, None, None] * m + np.arange(m)[None, None, :, None])
        cols = (np.arange(gw)[None, :, None, None] * m + np.arange(m)[None, None, None, :])
        rows, cols = np.broadcast_to(rows, (gh, gw, m, m)), np.broadcast_to(cols, (gh, gw, m, m))
        pos = np.stack([rows.reshape(-1), cols.reshape(-1)], -1)
        unit_positions.append(np.tile(pos.reshape(gh * gw, unit, 2), (t, 1, 1)))
        offset += t * gh * gw
    window_index = np.concatenate(window_units).astype(np.int32)
    positions = np.concatenate(unit_positions)[window_index].reshape(-1, 2).astype(np.int32)
    wg, wi = _groups(window_lens)
    fg, fi = _groups(frame_lens)
    return VisionLayout(window_index, np.argsort(window_index).astype(np.int32), positions, wg, wi, fg, fi)


def vision_rope(positions: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """HF's axial 2-D rotary: head_dim/4 frequencies for rows, the same for columns, repeated twice."""
    inv = rope_inv_freq(head_dim // 2, VISION_ROPE_THETA)
    pos = positions.astype(np.float32)
    freqs = np.concatenate([pos[:, :1] * inv, pos[:, 1:] * inv], -1)
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def grouped_attention(q, k, v, groups: jax.Array, inverse: jax.Array, impl: str) -> jax.Array:
    """Attention within each group of a padded [G, L] index block; q, k, v [N, H, d] -> [N, H, d]."""
    valid = groups >= 0  # each row's valid entries come first (vision_layout's _groups)
    idx = jnp.maximum(groups, 0)
    out = attention(q[idx], k[idx], v[idx], valid[:, None, :], kv_lengths=valid.sum(-1), impl=impl)  # [G, L, H, d]
    return out.reshape(-1, *out.shape[2:])[inverse]


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str = "einsum"

    @nn.compact
    def __call__(self, x, cos, sin, window_groups, window_inverse, frame_groups, frame_inverse, is_full):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        h = RMSNorm(VISION_NORM_EPS, sh.VISION_EMBED, name="norm1", **kw)(x)
        qkv = dense((3, heads, head_dim), [sh.VISION_EMBED], [sh.QKV, sh.VISION_HEADS, sh.HEAD_DIM],
                    use_bias=True, name="qkv", **kw)(h)
        q, k, v = apply_rope(qkv[:, 0], cos, sin), apply_rope(qkv[:, 1], cos, sin), qkv[:, 2]
        impl = self.attention_impl
        out = jax.lax.cond(is_full,
                           lambda: grouped_attention(q, k, v, frame_groups, frame_inverse, impl),
                           lambda: grouped_attention(q, k, v, window_groups, window_inverse, impl))
        x = x + dense(cfg.hidden_size, [sh.VISION_HEADS, sh.HEAD_DIM], [sh.VISION_EMBED], axis=(-2, -1),
                      use_bias=True, name="proj", **kw)(out)
        h = RMSNorm(VISION_NORM_EPS, sh.VISION_EMBED, name="norm2", **kw)(x)
        x = x + GatedMLP(cfg.intermediate_size, sh.VISION_EMBED, sh.VISION_MLP, use_bias=True, name="mlp", **kw)(h)
        x = nn.with_logical_constraint(x, (sh.ACT_TOKENS, sh.ACT_EMBED))
        return x, None


class PatchMerger(nn.Module):
    """RMSNorm, then each merge x merge unit's patches concatenated -> Linear, GELU, Linear."""
    cfg: VisionConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        x = RMSNorm(VISION_NORM_EPS, sh.VISION_EMBED, name="ln_q", **kw)(x).reshape(-1, width)
        x = dense(width, [sh.VISION_MERGE_IN], [sh.VISION_MERGE], use_bias=True, name="fc1", **kw)(x)
        x = nn.gelu(x, approximate=False)
        return dense(cfg.out_hidden_size, [sh.VISION_MERGE], [sh.EMBED], use_bias=True, name="fc2", **kw)(x)


class VisionTower(nn.Module):
    cfg: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    unroll_layers: bool = False
    attention_impl: str = "einsum"

    @nn.compact
    def __call__(self, pixel_values: jax.Array, grids: tuple[Grid, ...]) -> jax.Array:
        cfg = self.cfg
        grids = tuple(tuple(int(v) for v in g) for g in grids)
        layout = vision_layout(grids, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        num_patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape != (num_patches, patch_dim):
            raise ValueError(f"pixel_values shape {pixel_values.shape}: grids {grids} need "
                             f"({num_patches}, {patch_dim})")
        unit = cfg.spatial_merge_size ** 2
        kernel = self.param("patch_embed", normal_init((sh.VISION_PATCH, sh.VISION_EMBED)),
                            (patch_dim, cfg.hidden_size), self.param_dtype)
        x = jnp.dot(pixel_values.astype(self.dtype), kernel.astype(self.dtype))
        x = x.reshape(-1, unit, cfg.hidden_size)[layout.window_index].reshape(num_patches, cfg.hidden_size)
        x = nn.with_logical_constraint(x, (sh.ACT_TOKENS, sh.ACT_EMBED))
        cos, sin = vision_rope(layout.positions, cfg.hidden_size // cfg.num_heads)
        is_full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)
        bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"vision.fullatt_block_indexes {bad} outside 0..{cfg.depth - 1}")
        blocks = scanned(VisionBlock, cfg.depth, self.remat, in_axes=(nn.broadcast,) * 6 + (0,),
                         unroll=self.unroll_layers)
        x, _ = blocks(cfg, self.dtype, self.param_dtype, self.attention_impl, name="blocks")(
            x, jnp.asarray(cos), jnp.asarray(sin), jnp.asarray(layout.window_groups),
            jnp.asarray(layout.window_inverse), jnp.asarray(layout.frame_groups),
            jnp.asarray(layout.frame_inverse), jnp.asarray(is_full))
        merged = PatchMerger(cfg, self.dtype, self.param_dtype, name="merger")(x)
        return merged[layout.reverse_index]

"""Frames -> the vision tower's input, laid out as transformers' Qwen2-VL video processor does.

Numpy only (the training input pipeline runs it on the host). Four steps, each
equal to what `Qwen2VLVideoProcessor` does (tests/test_tokens.py compares them
on random frames):

1. size: `smart_resize` — both sides multiples of 28 (patch 14 x merge 2), the
   pixel count within [min_pixels, max_pixels], the aspect ratio kept;
2. resize: bicubic with antialiasing on uint8, horizontal pass then vertical
   pass, each rounded and clipped to uint8, with int16 fixed-point weights. This
   is torchvision's uint8 path (the processor calls `tvF.resize` on uint8
   frames), reproduced bit for bit;
3. normalize with the OpenAI CLIP mean/std, fused as (x - 255 mean) / (255 std)
   in float32;
4. pad the frame count to a multiple of temporal_patch_size by repeating the
   last frame, then patchify to [grid_t * grid_h * grid_w, C * tps * 14 * 14]
   in the processor's order: for each temporal grid, the 2x2 merge blocks row by
   row, the four patches of a block row by row; within a patch (C, t, y, x).

Because of that order the vision tower's merged token m of a video is temporal
grid m // (Hm * Wm), merged cell m % (Hm * Wm) in row-major order over the
(Hm, Wm) = (grid_h / 2, grid_w / 2) merged grid: the index `tokens.py` selects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from traser_jax.config import TokenConfig, VisionConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's rule: sides multiples of `factor`, pixels in [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame aspect ratio must be under 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_size(height: int, width: int, vision: VisionConfig, tokens: TokenConfig) -> tuple[int, int]:
    """The frame size the vision tower sees for a video of `height` x `width`: `tokens.frame_size`
    when set (one grid for a whole training batch), else the published smart_resize."""
    factor = vision.patch_size * vision.spatial_merge_size
    if tokens.frame_size:
        if len(tokens.frame_size) != 2 or any(int(s) <= 0 or int(s) % factor for s in tokens.frame_size):
            raise ValueError(f"tokens.frame_size must be [height, width], positive multiples of {factor}, "
                             f"got {tokens.frame_size}")
        return int(tokens.frame_size[0]), int(tokens.frame_size[1])
    return smart_resize(height, width, factor, tokens.min_pixels, tokens.max_pixels)


# -- resize ---------------------------------------------------------------------

def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices [out, taps], int weights [out, taps] and their precision (bits)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # the cubic's support, widened when shrinking
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    # int() truncates toward zero, as the C++ static_cast does
    lo = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(centers + support + 0.5), in_size).astype(np.int64)
    taps = int((hi - lo).max())
    j = np.arange(taps)
    valid = j[None, :] < (hi - lo)[:, None]
    w = np.where(valid, _keys_cubic((j[None, :] + lo[:, None] - centers[:, None] + 0.5) * invscale), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1.0), w)
    precision = 0  # the most bits that keep the largest weight inside int16
    while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    w_int = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    index = np.minimum(lo[:, None] + j[None, :], in_size - 1)
    return index, w_int, precision


def _resize_rows(x: np.ndarray, out_size: int) -> np.ndarray:
    """Resize uint8 x [in, ...] along axis 0 (whole rows gathered per tap: fast in numpy)."""
    index, w_int, precision = _resize_taps(x.shape[0], out_size)
    # int32 holds every sum unless the weights are extreme (then int64)
    dtype = np.int32 if 255 * int(np.abs(w_int).sum(axis=1).max()) + (1 << precision) < 2 ** 31 else np.int64
    acc = np.full((out_size,) + x.shape[1:], 1 << (precision - 1), dtype)
    weights = w_int.astype(dtype).reshape(out_size, -1, *([1] * (x.ndim - 1)))
    x = x.astype(dtype)
    for k in range(index.shape[1]):
        acc += x[index[:, k]] * weights[:, k]
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 frames [T, H, W, C] -> [T, height, width, C], bicubic antialiased (torchvision's uint8 path)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, C], got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), np.uint8)
    for i, frame in enumerate(frames):  # one frame at a time keeps the int accumulators small
        if frame.shape[1] != width:  # the horizontal pass first, as torchvision does
            frame = _resize_rows(np.ascontiguousarray(frame.transpose(1, 0, 2)), width).transpose(1, 0, 2)
        if frame.shape[0] != height:
            frame = _resize_rows(np.ascontiguousarray(frame), height)
        out[i] = frame
    return out


# -- normalize + patchify -------------------------------------------------------

def normalize(frames: np.ndarray, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """uint8 [T, H, W, C] -> float32 [T, C, H, W], (x / 255 - mean) / std computed as the processor does."""
    mean255 = np.asarray(mean, np.float32) * np.float32(255.0)
    std255 = np.asarray(std, np.float32) * np.float32(255.0)
    x = np.asarray(frames).transpose(0, 3, 1, 2).astype(np.float32)
    return (x - mean255[None, :, None, None]) / std255[None, :, None, None]


def patchify(frames: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float [T, C, H, W] -> (pixel_values [grid_t*grid_h*grid_w, C*tps*p*p], (grid_t, grid_h, grid_w))."""
    t, c, h, w = frames.shape
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size="
                         f"{patch_size * merge_size}; resize it first")
    if pad := -t % temporal_patch_size:  # repeat the last frame, as the processor does
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)), (gt, gh, gw)


@dataclass
class VideoPatches:
    pixel_values: np.ndarray  # float32 [grid_t * grid_h * grid_w, C * tps * p * p]
    grid_thw: tuple[int, int, int]  # (grid_t, grid_h, grid_w) in patches
    resized_hw: tuple[int, int]  # frame size the tower saw
    merge_size: int = 2

    @property
    def num_merged_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size ** 2


def preprocess_video(frames: np.ndarray, vision: VisionConfig, tokens: TokenConfig) -> VideoPatches:
    """uint8 frames [T, H, W, 3] (the sampled frames) -> the vision tower's input."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != vision.in_channels:
        raise ValueError(f"frames must be [T, H, W, {vision.in_channels}], got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty: a video needs at least one sampled frame")
    h, w = resized_size(frames.shape[1], frames.shape[2], vision, tokens)
    pixel_values, grid = patchify(normalize(resize_frames(frames, h, w)), vision.patch_size,
                                  vision.temporal_patch_size, vision.spatial_merge_size)
    return VideoPatches(pixel_values, grid, (h, w), vision.spatial_merge_size)

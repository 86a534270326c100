"""COCO run-length encoding of binary masks, in numpy alone.

Same bytes as pycocotools (`mask.encode` / `mask.decode`): runs are counted in
column-major order starting with a run of zeros, and `counts` is the compressed
LEB128-like string. The record stores masks this way so any COCO tool reads them.
"""
from __future__ import annotations

import numpy as np

Rle = dict  # {"size": [height, width], "counts": str}


def encode(mask: np.ndarray) -> Rle:
    """Binary mask [H, W] -> COCO compressed RLE."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    return {"size": [int(h), int(w)], "counts": _counts_to_string(_runs(flat))}


def decode(rle: Rle) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list) -> uint8 mask [H, W]."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = _string_to_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h}*{w}={h * w}")
    values = np.arange(len(counts)) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    return flat.reshape((w, h)).T.copy()


def empty(height: int, width: int) -> Rle:
    """The RLE of an all-zero mask: how an absent object is stored on a frame."""
    return {"size": [int(height), int(width)], "counts": _counts_to_string([int(height) * int(width)])}


def area(rle: Rle) -> int:
    counts = rle["counts"]
    counts = _string_to_counts(counts) if isinstance(counts, (str, bytes)) else counts
    return int(sum(counts[1::2]))


def bbox(rle: Rle) -> tuple[float, float, float, float] | None:
    """Tight box [x0, y0, x1, y1] (x1, y1 exclusive) of a mask, None when empty."""
    mask = decode(rle)
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


def _runs(flat: np.ndarray) -> list[int]:
    n = flat.size
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [n]])
    runs = np.diff(bounds).tolist()
    if n and flat[0]:  # COCO runs start with zeros
        runs = [0] + runs
    return [int(r) for r in runs] if n else [0]


def _counts_to_string(counts: list[int]) -> str:
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _string_to_counts(s: str | bytes) -> list[int]:
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts

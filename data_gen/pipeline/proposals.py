"""Stage 1: object proposals on every k-th frame, then the largest-first overlap filter.

The segmenter is any callable frame -> list of boolean masks; in production it is
SAM2's automatic mask generator with multi-scale point grids
(`sam2_backend.Sam2MaskGenerator`), in tests an oracle built on ground truth.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage
from tqdm import tqdm

Segmenter = Callable[[np.ndarray], list[np.ndarray]]


def proposal_positions(num_frames: int, frame_stride: int) -> list[int]:
    return list(range(0, num_frames, frame_stride))


def keep_largest_first(masks: list[np.ndarray], max_covered: float = 0.9) -> list[np.ndarray]:
    """Masks sorted by area, largest first; one whose area is >= max_covered already
    covered by the masks kept before it is dropped."""
    order = sorted(range(len(masks)), key=lambda i: (-int(masks[i].sum()), i))
    kept: list[np.ndarray] = []
    covered = None
    for i in order:
        m = masks[i].astype(bool)
        area = int(m.sum())
        if area == 0:
            continue
        if covered is None:
            covered = np.zeros_like(m)
        if int((m & covered).sum()) >= max_covered * area:
            continue
        kept.append(m)
        covered |= m
    return kept


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill holes and remove islands smaller than `min_area` pixels (8-connectivity)."""
    if min_area <= 0:
        return mask
    eight = np.ones((3, 3), bool)
    out = mask.astype(bool).copy()
    for target in (False, True):  # holes first, then islands
        labels, n = ndimage.label(out == target, structure=eight)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())
        small = np.flatnonzero(sizes < min_area)
        small = small[small > 0]
        if small.size:
            if not target:  # a hole touching the border is background, not a hole
                border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
                small = np.setdiff1d(small, border)
            out[np.isin(labels, small)] = not target
    return out


def propose(frames: np.ndarray, segmenter: Segmenter, frame_stride: int, max_covered: float = 0.9,
            progress: bool = False) -> dict[int, list[np.ndarray]]:
    """Stage 1 on one video: {frame position: filtered masks, largest first}."""
    out: dict[int, list[np.ndarray]] = {}
    positions = proposal_positions(len(frames), frame_stride)
    for p in tqdm(positions, desc="proposals", disable=not progress, leave=False):
        out[p] = keep_largest_first(segmenter(frames[p]), max_covered)
    return out

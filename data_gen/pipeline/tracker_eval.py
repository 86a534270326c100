"""Scoring the tracker's logic against ground truth, with an oracle in place of SAM2.

The oracle knows the true per-frame masks of a toyworld video and makes the
mistakes a segmenter and a video propagator make:

- `OracleSegmenter` (stage 1): drops each object's proposal with probability
  `drop`, jitters every mask (a shift of up to one pixel in x and y) and adds a
  spurious blob with probability `spurious`.
- `OraclePropagator` (stage 2): follows the true object its seed mask overlaps
  most (IoU >= 0.5; a seed on nothing, e.g. a spurious blob, is followed nowhere).
  Its mistakes depend on the content, as a deterministic network's do: each
  (true object, frame) is "hard" with probability `lose` and "missed" with
  probability `miss`, drawn once from (seed, object, frame), so every pass meets
  the same difficulties. On a frame the object shows, a track returns a jittered
  true mask (one per object and frame: two tracks of one object agree, as with
  SAM2), nothing on a missed frame, and on a hard frame it loses the object until
  one of the track's conditioning frames re-anchors it (SAM2's drift: memory full
  of "no object"). Lost tracks stay lost across online passes (they continue from
  the same memory); `reset()` clears that. Conditioning memory is used from the
  start of a pass whatever its time (SAM2 attends to every conditioning frame), so
  the offline replay follows an object before the frame where it was found.

`score_tracks` then measures identity switches, late-entering objects missed and
mean mask IoU (per object, with one identity) on the frames the tracks are given on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment

from data_gen.pipeline.tracking import Tracks



def jitter_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask shifted by -1, 0 or +1 pixel in x and in y (boundary error of about one pixel)."""
    dy, dx = rng.integers(-1, 2, size=2)
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def masks_of(labels: np.ndarray) -> dict[int, np.ndarray]:
    """{object id: mask} of a label map (int [H, W]: body index, negative = background; id = index + 1)."""
    return {int(i) + 1: labels == i for i in np.unique(labels) if i >= 0}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


class OracleSegmenter:
    def __init__(self, frames: np.ndarray, labels: np.ndarray, seed: int = 0, drop: float = 0.3,
                 spurious: float = 0.2, jitter: bool = True):
        self._position = {frames[p].tobytes(): p for p in range(len(frames))}
        self._frames = frames
        self.labels = labels
        self.rng = np.random.default_rng(seed)
        self.drop, self.spurious, self.jitter = drop, spurious, jitter

    def __call__(self, frame: np.ndarray) -> list[np.ndarray]:
        position = self._position.get(frame.tobytes())
        if position is None:  # a decoded (lossy) copy of the video: the nearest frame
            diff = np.abs(self._frames.astype(np.int16) - frame.astype(np.int16)).mean(axis=(1, 2, 3))
            position = int(diff.argmin())
        labels = self.labels[position]
        out = [jitter_mask(m, self.rng) if self.jitter else m
               for m in masks_of(labels).values() if self.rng.random() >= self.drop]
        if self.rng.random() < self.spurious:
            h, w = labels.shape
            cy, cx, r = self.rng.integers(0, h), self.rng.integers(0, w), self.rng.integers(4, 9)
            yy, xx = np.ogrid[:h, :w]
            out.append((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
        return [m for m in out if m.any()]


class OraclePropagator:
    def __init__(self, labels: np.ndarray, seed: int = 0, miss: float = 0.05, lose: float = 0.02,
                 jitter: bool = True):
        self.labels = labels
        self.seed = seed
        self.miss, self.lose, self.jitter = miss, lose, jitter
        self.reset()

    def start(self, frames: np.ndarray) -> None:
        if len(frames) != len(self.labels):
            raise ValueError(f"the oracle knows {len(self.labels)} frames, got a video of {len(frames)}")
        self.reset()

    def reset(self) -> None:
        self.target: dict[int, int | None] = {}  # obj id -> true object id it follows (None: nothing)
        self.seeds: dict[int, dict[int, np.ndarray]] = {}  # obj id -> {position: seed mask}
        self.lost: set[int] = set()

    def add_mask(self, position: int, obj_id: int, mask: np.ndarray) -> None:
        truth = masks_of(self.labels[position])
        best = max(truth, key=lambda g: _iou(mask, truth[g]), default=None)
        self.target[obj_id] = best if best is not None and _iou(mask, truth[best]) >= 0.5 else None
        self.seeds.setdefault(obj_id, {})[position] = np.asarray(mask, bool)

    def _view(self, g: int, p: int, truth: np.ndarray) -> tuple[bool, bool, np.ndarray]:
        """(hard, missed, mask) of true object g on frame p: fixed by the content, the same in every pass."""
        rng = np.random.default_rng((self.seed, g, p))
        hard, missed = rng.random() < self.lose, rng.random() < self.miss
        return hard, missed, jitter_mask(truth, rng) if self.jitter else truth

    def propagate(self, start: int, end: int) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        empty = np.zeros(self.labels.shape[1:], bool)
        for p in range(start, end + 1):
            truth = masks_of(self.labels[p])
            out = {}
            for obj_id, g in self.target.items():
                if p in self.seeds[obj_id]:
                    out[obj_id] = self.seeds[obj_id][p]  # a conditioning frame re-anchors a lost object
                    self.lost.discard(obj_id)
                    continue
                if g is None or obj_id in self.lost or g not in truth:
                    out[obj_id] = empty
                    continue
                hard, missed, mask = self._view(g, p, truth[g])
                if hard:
                    self.lost.add(obj_id)
                out[obj_id] = empty if hard or missed else mask
            yield p, out


@dataclass
class TrackScore:
    objects: int = 0  # true objects
    id_switches: int = 0  # changes of the matched track id along a true object's frames
    late_objects: int = 0  # true objects not visible on the first frame
    late_missed: int = 0  # ... that no single track follows with trajectory IoU >= 0.5
    missed: int = 0  # all true objects no single track follows with trajectory IoU >= 0.5
    trajectory_iou_sum: float = 0.0  # per true object: IoU with its best single track over the whole video
    frame_iou_sum: float = 0.0  # per (true object, visible frame): IoU with the track matched on that frame
    frame_iou_count: int = 0

    @property
    def mean_iou(self) -> float:
        """Mean over true objects of the trajectory IoU with the track that follows it best (identity-aware)."""
        return self.trajectory_iou_sum / max(self.objects, 1)

    @property
    def frame_iou(self) -> float:
        """Mean per-frame IoU of one-to-one matches, ignoring identities (0 where unmatched)."""
        return self.frame_iou_sum / max(self.frame_iou_count, 1)

    def __add__(self, other: "TrackScore") -> "TrackScore":
        return TrackScore(*(a + b for a, b in zip(self._values(), other._values())))

    def _values(self):
        return (self.objects, self.id_switches, self.late_objects, self.late_missed, self.missed,
                self.trajectory_iou_sum, self.frame_iou_sum, self.frame_iou_count)

    def summary(self) -> dict:
        return {"objects": self.objects, "id_switches": self.id_switches, "late_objects": self.late_objects,
                "late_missed": self.late_missed, "missed": self.missed, "mean_iou": round(self.mean_iou, 4),
                "frame_iou": round(self.frame_iou, 4)}


def score_tracks(tracks: Tracks, truth: list[dict[int, np.ndarray]], match_iou: float = 0.5) -> TrackScore:
    """Score `tracks` against true masks on the same frames (`truth[j]`: {true id: mask} of visible objects).

    Trajectory IoU of a true object and a track: intersections over unions summed
    over all frames (the video-segmentation J, which needs one identity throughout).
    `mean_iou` averages, over true objects, the trajectory IoU with the track that
    follows the object best; an object is missed when that is under 0.5. Per
    frame, true and predicted masks are also matched one to one by maximum IoU
    (Hungarian): `frame_iou` averages the matched IoU over every (true object,
    visible frame), and an identity switch is a change of the track matched with
    IoU >= `match_iou` along a true object's frames."""
    if len(truth) != len(tracks.positions):
        raise ValueError(f"truth has {len(truth)} frames, the tracks {len(tracks.positions)}")
    true_ids = sorted({g for frame in truth for g in frame})
    pred_ids = tracks.ids
    gi = {g: k for k, g in enumerate(true_ids)}
    inter = np.zeros((len(true_ids), len(pred_ids)))
    true_area = np.zeros(len(true_ids))
    pred_area = np.zeros(len(pred_ids))
    first_seen = {g: min(j for j, f in enumerate(truth) if g in f) for g in true_ids}
    last_match: dict[int, int] = {}
    score = TrackScore(objects=len(true_ids))
    for j, frame in enumerate(truth):
        pred = tracks.frame_masks(j, pred_ids).reshape(len(pred_ids), -1).astype(np.float32)
        pred_sizes = pred.sum(1)
        pred_area += pred_sizes
        gts = sorted(frame)
        if not gts:
            continue
        gmat = np.stack([frame[g].ravel() for g in gts]).astype(np.float32)
        ints = gmat @ pred.T
        areas = gmat.sum(1)
        rows = [gi[g] for g in gts]
        true_area[rows] += areas
        inter[rows] += ints
        ious = ints / np.maximum(areas[:, None] + pred_sizes[None, :] - ints, 1)
        matched = dict(zip(*linear_sum_assignment(-ious))) if len(pred_ids) else {}
        for r, g in enumerate(gts):
            c = matched.get(r)
            iou = float(ious[r, c]) if c is not None else 0.0
            score.frame_iou_sum += iou
            score.frame_iou_count += 1
            if c is not None and iou >= match_iou:
                if g in last_match and last_match[g] != pred_ids[c]:
                    score.id_switches += 1
                last_match[g] = pred_ids[c]
    union = true_area[:, None] + pred_area[None, :] - inter
    best = (inter / np.maximum(union, 1)).max(1) if len(pred_ids) else np.zeros(len(true_ids))
    score.trajectory_iou_sum = float(best.sum())
    for g in true_ids:
        missed = best[gi[g]] < 0.5
        score.missed += int(missed)
        if first_seen[g] > 0:
            score.late_objects += 1
            score.late_missed += int(missed)
    return score

"""Stage 2: the online-offline tracker, written against a small propagator interface.

Online: seed every proposal of the first non-empty proposal frame and propagate.
At each check frame (every `frame_stride * (N // 100 + 1)` frames), the region no
track covers is the untracked region; when it is at least 5% of the frame, a
proposal lying >= 90% inside an existing track belongs to it, and an unmatched
proposal with >= 10% of its area in the untracked region becomes a new object;
then everything is re-propagated from the check frame. At most 65 objects.
(Read as "10% of the whole untracked region", the rule would add no object
smaller than ~10% of the frame, i.e. almost none: we read it per proposal.)

Offline replay: reset the propagator, seed every object with the mask that
created it at the frame where it was created, and propagate once from frame 0,
so each trajectory comes from one consistent pass (and covers the frames before
the object was first found).

The propagator is SAM2's video predictor in production
(`sam2_backend.Sam2Propagator`); tests plug in an oracle built on ground truth.
Frames are addressed by position in the decoded frame array.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from data_gen import rle as rle_lib
from data_gen.pipeline.config import TrackingConfig


class Propagator(Protocol):
    def start(self, frames: np.ndarray) -> None:
        """Load a video (uint8 [N, H, W, 3]); forgets any previous video and objects."""

    def reset(self) -> None:
        """Forget every object and all tracking memory; the video stays loaded."""

    def add_mask(self, position: int, obj_id: int, mask: np.ndarray) -> None:
        """Condition object `obj_id` on a boolean mask [H, W] at frame `position`."""

    def propagate(self, start: int, end: int) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        """Track every object over frames start..end (inclusive, in order): (position, {id: bool mask})."""


@dataclass
class Tracks:
    """Object masks on a list of frame positions, stored as COCO RLE (compact for long videos)."""
    positions: list[int]
    height: int
    width: int
    masks: dict[int, list[dict]] = field(default_factory=dict)  # obj id -> RLE per position
    seeds: dict[int, int] = field(default_factory=dict)  # obj id -> position where it was found

    @property
    def ids(self) -> list[int]:
        return sorted(self.masks)

    def mask(self, obj_id: int, j: int) -> np.ndarray:
        return rle_lib.decode(self.masks[obj_id][j]).astype(bool)

    def frame_masks(self, j: int, ids: list[int] | None = None) -> np.ndarray:
        """bool [K, H, W]: every object's mask on the j-th position."""
        ids = self.ids if ids is None else ids
        out = np.zeros((len(ids), self.height, self.width), bool)
        for k, i in enumerate(ids):
            out[k] = self.mask(i, j)
        return out

    def areas(self) -> dict[int, list[int]]:
        return {i: [rle_lib.area(m) for m in ms] for i, ms in self.masks.items()}

    def to_dict(self) -> dict:
        return {"positions": self.positions, "height": self.height, "width": self.width,
                "masks": {str(k): v for k, v in self.masks.items()}, "seeds": {str(k): v for k, v in self.seeds.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Tracks":
        return cls(positions=[int(p) for p in d["positions"]], height=int(d["height"]), width=int(d["width"]),
                   masks={int(k): v for k, v in d["masks"].items()}, seeds={int(k): int(v) for k, v in d["seeds"].items()})


class _Collector:
    """Keeps the latest mask of each object on the output positions, as RLE."""

    def __init__(self, positions: list[int], height: int, width: int):
        self.tracks = Tracks(positions=list(positions), height=height, width=width)
        self._index = {p: j for j, p in enumerate(positions)}
        self._empty = rle_lib.empty(height, width)

    def add_object(self, obj_id: int, seed_position: int) -> None:
        self.tracks.masks.setdefault(obj_id, [self._empty] * len(self.tracks.positions))
        self.tracks.seeds.setdefault(obj_id, seed_position)

    def put(self, position: int, masks: dict[int, np.ndarray]) -> None:
        j = self._index.get(position)
        if j is None:
            return
        for obj_id, m in masks.items():
            self.tracks.masks[obj_id][j] = rle_lib.encode(m) if m.any() else self._empty


def check_positions(num_frames: int, proposal_positions: list[int], first: int, frame_stride: int,
                    cfg: TrackingConfig) -> list[int]:
    every = cfg.check_every_samples or (num_frames // 100 + 1)
    stride = frame_stride * every
    return [p for p in proposal_positions if p > first and p % stride == 0]


def new_objects(tracked: list[np.ndarray], proposals: list[np.ndarray], cfg: TrackingConfig,
                budget: int) -> list[np.ndarray]:
    """The proposals at a check frame that become new objects (at most `budget`)."""
    if budget <= 0 or not proposals:
        return []
    shape = proposals[0].shape
    covered = np.zeros(shape, bool)
    for t in tracked:
        covered |= t
    untracked_area = int((~covered).sum())
    if untracked_area < cfg.min_untracked * covered.size:
        return []
    untracked = ~covered
    owners = list(tracked)
    found: list[np.ndarray] = []
    for p in proposals:
        area = int(p.sum())
        if area == 0:
            continue
        if any(int((p & t).sum()) >= cfg.belongs * area for t in owners):
            continue  # part of an object already tracked (or just added)
        if int((p & untracked).sum()) >= cfg.new_object_untracked * area:
            found.append(p)
            owners.append(p)
            if len(found) >= budget:
                break
    return found


@dataclass
class OnlineResult:
    tracks: Tracks  # what the online pass alone produced
    seed_masks: dict[int, tuple[int, np.ndarray]]  # obj id -> (position, mask) that created it


def track_online(propagator: Propagator, num_frames: int, proposals: dict[int, list[np.ndarray]],
                 frame_stride: int, cfg: TrackingConfig, output_positions: list[int],
                 height: int, width: int) -> OnlineResult:
    """The online pass. `proposals` maps proposal-frame positions to masks (largest first)."""
    collector = _Collector(output_positions, height, width)
    positions = sorted(proposals)
    first = next((p for p in positions if proposals[p]), None)
    seeds: dict[int, tuple[int, np.ndarray]] = {}
    if first is None:
        return OnlineResult(collector.tracks, seeds)
    checks = check_positions(num_frames, positions, first, frame_stride, cfg)
    propagator.reset()

    def seed(position: int, masks: list[np.ndarray]) -> None:
        for m in masks:
            obj_id = len(seeds) + 1
            seeds[obj_id] = (position, m)
            collector.add_object(obj_id, position)
            propagator.add_mask(position, obj_id, m)

    seed(first, proposals[first][: cfg.max_objects])
    bounds = [first] + checks
    current: dict[int, np.ndarray] = {}
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else num_frames - 1
        if i > 0:
            found = new_objects(list(current.values()), proposals[start], cfg, cfg.max_objects - len(seeds))
            seed(start, found)
        for position, masks in propagator.propagate(start, end):
            collector.put(position, masks)
            if position == end:
                current = masks
    return OnlineResult(collector.tracks, seeds)


def replay_offline(propagator: Propagator, num_frames: int, seeds: dict[int, tuple[int, np.ndarray]],
                   output_positions: list[int], height: int, width: int) -> Tracks:
    """One pass from frame 0 with every object seeded where it was found."""
    collector = _Collector(output_positions, height, width)
    if not seeds:
        return collector.tracks
    propagator.reset()
    for obj_id, (position, mask) in sorted(seeds.items()):
        collector.add_object(obj_id, position)
        propagator.add_mask(position, obj_id, mask)
    for position, masks in propagator.propagate(0, num_frames - 1):
        collector.put(position, masks)
    return collector.tracks


def track(propagator: Propagator, frames: np.ndarray, proposals: dict[int, list[np.ndarray]], frame_stride: int,
          cfg: TrackingConfig, output_positions: list[int]) -> Tracks:
    """Stage 2 on one video: online discovery, then (by default) the offline replay."""
    n, h, w = frames.shape[:3]
    propagator.start(frames)
    online = track_online(propagator, n, proposals, frame_stride, cfg, output_positions, h, w)
    if not cfg.offline_replay:
        return online.tracks
    return replay_offline(propagator, n, online.seed_masks, output_positions, h, w)

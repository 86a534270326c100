"""The toyworld object catalog: labelled crops of single objects, drawn without a video.

For pretraining a vision tower from scratch on what toyworld objects look like (the demo's stage 0,
`traser_jax.pretrain_vision --catalog N`): crop i of a seed is one object, drawn as the scenes draw
it (`world.new_body`: shape, color, size, texture; `draw.paint`), near the middle of a window on a
scene background, among up to `max_distractors` other objects that may hide part of it, at two
moments a second apart (the two frames of a temporal patch at ~1 fps), as a wanderer moves.

The window is `crop` x `crop` pixels of a frame that training resizes to `frame_size`; the crop is
drawn at the native scale of a frame whose sides the config's knobs pick, so an object covers the
share of the window it covers in a video. Deterministic in (seed, index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_gen.toyworld.draw import BACKGROUND, paint
from data_gen.toyworld.world import ToyworldConfig, draw_background, new_body

MOVE_PER_S = (0.0, 0.22)  # a wanderer's speed range, in frame sides per second (world._assign_roles)
STREAM = 1  # the catalog's random stream, apart from the scenes' ([seed, index]) of the same seed


@dataclass
class CatalogCrop:
    frames: np.ndarray  # uint8 [2, h, w, 3] at the native scale: resize to crop x crop for training
    name: str  # the object's shape
    attributes: list[str]  # [color, size, texture]
    mask: np.ndarray  # bool [h, w]: where the object shows in the first frame


def catalog_crop(seed: int, index: int, crop: int, frame_size: tuple[int, int], jitter: float = 0.125,
                 max_distractors: int = 2, config: ToyworldConfig | None = None) -> CatalogCrop:
    """Crop `index` of catalog `seed` (module doc); its object's centroid lies within `jitter` crops
    of the window's middle in the first frame."""
    if not 0 <= jitter <= 0.5:
        raise ValueError(f"jitter {jitter} must lie in [0, 0.5] (a fraction of the crop side)")
    if crop <= 0 or crop > min(frame_size):
        raise ValueError(f"crop {crop} must lie in 1..{min(frame_size)} (the frame size {frame_size})")
    config = config or ToyworldConfig()
    rng = np.random.default_rng([seed, index, STREAM])
    sides = np.arange(config.min_side, config.max_side + 1, config.side_step)
    width, height = int(rng.choice(sides)), int(rng.choice(sides))
    h, w = round(crop * height / frame_size[0]), round(crop * width / frame_size[1])
    side = min(width, height)
    bodies = [new_body(rng, i, side) for i in range(1 + int(rng.integers(0, max_distractors + 1)))]
    start = {0: (w / 2 + rng.uniform(-jitter, jitter) * w, h / 2 + rng.uniform(-jitter, jitter) * h)}
    for b in bodies[1:]:  # anywhere, partly outside the window too
        start[b.index] = (rng.uniform(-b.radius, w + b.radius), rng.uniform(-b.radius, h + b.radius))
    step = {}
    for b in bodies:
        speed, heading = rng.uniform(*MOVE_PER_S) * side, rng.uniform(0, 2 * math.pi)
        step[b.index] = (speed * math.cos(heading), speed * math.sin(heading))
    background = draw_background(rng, h, w)
    frames = np.empty((2, h, w, 3), np.uint8)
    for t in range(2):
        frames[t] = background
        labels = np.full((h, w), BACKGROUND, np.int16)
        for b in sorted(bodies, key=lambda b: -b.depth):  # far to near, as a scene is drawn
            paint(frames[t], labels, b, start[b.index][0] + t * step[b.index][0],
                  start[b.index][1] + t * step[b.index][1])
        if t == 0:
            mask = labels == 0
    target = bodies[0]
    return CatalogCrop(frames, target.shape, [target.color, target.size, target.texture], mask)

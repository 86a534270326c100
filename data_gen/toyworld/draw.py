"""Drawing a toyworld frame: the picture and, pixel for pixel, who is visible where.

Objects are painted far to near (largest depth first), so a nearer object
overwrites a farther one; the label map records the last object painted on each
pixel. An object's visible mask is therefore exactly the set of pixels that show
its colors in the frame.
"""
from __future__ import annotations

import numpy as np

from data_gen.toyworld import shapes
from data_gen.toyworld.world import Body, Scene

BACKGROUND = -1  # label of pixels no object covers


def silhouette(scene: Scene, body: Body, step: int):
    """(y0, x0, inside crop) of the body's whole shape at a physics step, or None (absent / out of the image)."""
    if not scene.present[body.index, step]:
        return None
    cx, cy = scene.pos[body.index, step]
    return shapes.rasterize(body.shape, float(cx), float(cy), body.radius, scene.height, scene.width)


def full_mask(scene: Scene, body: Body, frame: int) -> np.ndarray:
    """bool [H, W]: the body's shape drawn alone on frame `frame` (what it would cover without occluders)."""
    out = np.zeros((scene.height, scene.width), bool)
    sil = silhouette(scene, body, scene.step_of_frame(frame))
    if sil is not None:
        y0, x0, inside = sil
        out[y0:y0 + inside.shape[0], x0:x0 + inside.shape[1]] = inside
    return out


def render_frame(scene: Scene, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """The frame `frame` (uint8 [H, W, 3]) and its label map (int16 [H, W]: body index, BACKGROUND elsewhere)."""
    step = scene.step_of_frame(frame)
    image = scene.background.copy()
    labels = np.full((scene.height, scene.width), BACKGROUND, np.int16)
    for body in sorted(scene.bodies, key=lambda b: -b.depth):  # far to near
        if scene.present[body.index, step]:
            cx, cy = scene.pos[body.index, step]
            paint(image, labels, body, float(cx), float(cy))
    return image, labels


def paint(image: np.ndarray, labels: np.ndarray, body: Body, cx: float, cy: float) -> None:
    """Draw `body` centered at (cx, cy) over `image` (uint8 [H, W, 3]) and write its index into
    `labels` (int16 [H, W]) where it shows, in place."""
    sil = shapes.rasterize(body.shape, cx, cy, body.radius, image.shape[0], image.shape[1])
    if sil is None:
        return
    y0, x0, inside = sil
    h, w = inside.shape
    pattern = shapes.texture_mask(body.texture, y0, x0, (h, w), cx, cy, body.radius, body.texture_angle)
    colors = np.where(pattern[..., None], np.array(shapes.pattern_color(body.color), np.uint8),
                      np.array(shapes.COLORS[body.color], np.uint8))
    image[y0:y0 + h, x0:x0 + w][inside] = colors[inside]
    labels[y0:y0 + h, x0:x0 + w][inside] = body.index

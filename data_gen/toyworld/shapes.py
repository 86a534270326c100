"""What a toyworld object looks like: shape, color, size, texture, and how it rasterizes.

Every object is drawn with hard edges (no antialiasing) so that the pixels an
object covers in a frame are exactly its visible mask, and every covered pixel
carries one of the object's two texture colors.
"""
from __future__ import annotations

import math

import numpy as np

# Unit outlines (outer radius 1, y pointing down as in images). Circles are analytic.
def _regular(n: int, start_deg: float) -> np.ndarray:
    a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    a, b = arm, 0.95
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                     (-b, -a), (-a, -a)])


OUTLINES: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),
    "triangle": _regular(3, -90.0),  # apex up
    "star": _star(),
    "hexagon": _regular(6, 0.0),  # flat top and bottom
    "diamond": np.array([(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]),
    "cross": _cross(),
}
SHAPES = tuple(OUTLINES)

# Radius relative to the collision radius used by the physics: roughly between the
# inscribed and the circumscribed circle, so contacts look like contacts.
COLLISION_FRACTION = {"circle": 1.0, "square": 0.9, "triangle": 0.7, "star": 0.72, "hexagon": 0.93,
                      "diamond": 0.8, "cross": 0.85}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 134, 20),
    "yellow": (238, 214, 30),
    "green": (44, 160, 60),
    "cyan": (30, 192, 205),
    "blue": (36, 72, 212),
    "purple": (134, 52, 192),
    "pink": (242, 112, 178),
}
# Outer radius as a fraction of the frame's shorter side.
SIZES: dict[str, float] = {"small": 0.055, "medium": 0.085, "large": 0.125}
TEXTURES = ("solid", "striped", "dotted", "checkered")


def pattern_color(color: str) -> tuple[int, int, int]:
    """The second color of a textured object: darker for light colors, lighter for dark ones."""
    rgb = np.array(COLORS[color], np.float64)
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    out = rgb * 0.45 if luma > 140 else rgb + (255.0 - rgb) * 0.6
    return tuple(int(round(c)) for c in out)


def extent(shape: str) -> tuple[float, float]:
    """(top, bottom) distances from the center, in units of the outer radius."""
    outline = OUTLINES[shape]
    if outline is None:
        return 1.0, 1.0
    return float(-outline[:, 1].min()), float(outline[:, 1].max())


def rasterize(shape: str, cx: float, cy: float, radius: float, height: int, width: int):
    """Pixels covered by the shape centered at (cx, cy), clipped to the image.

    Returns (y0, x0, inside) with `inside` a bool crop whose top-left pixel is
    (y0, x0), or None when nothing of the shape falls in the image. A pixel is
    covered when its center (x + 0.5, y + 0.5) lies inside the outline."""
    x0 = max(int(math.floor(cx - radius)), 0)
    x1 = min(int(math.ceil(cx + radius)) + 1, width)
    y0 = max(int(math.floor(cy - radius)), 0)
    y1 = min(int(math.ceil(cy + radius)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    px = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx) / radius
    py = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy) / radius
    gx, gy = np.meshgrid(px, py)
    outline = OUTLINES[shape]
    if outline is None:
        inside = gx * gx + gy * gy <= 1.0
    else:
        inside = _point_in_polygon(gx, gy, outline)
    if not inside.any():
        return None
    return y0, x0, inside


def _point_in_polygon(gx: np.ndarray, gy: np.ndarray, poly: np.ndarray) -> np.ndarray:
    # Even-odd rule: count edge crossings of a ray toward +x.
    inside = np.zeros(gx.shape, bool)
    for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0)):
        if ya == yb:
            continue
        crosses = (ya > gy) != (yb > gy)
        x_at = xa + (gy - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (gx < x_at)
    return inside


def texture_mask(texture: str, y0: int, x0: int, shape_hw: tuple[int, int], cx: float, cy: float, radius: float,
                 angle: float) -> np.ndarray:
    """Where the pattern color goes (bool, same crop as `rasterize`), in object coordinates so it moves with it."""
    h, w = shape_hw
    if texture == "solid":
        return np.zeros((h, w), bool)
    gx, gy = np.meshgrid(np.arange(x0, x0 + w) + 0.5 - cx, np.arange(y0, y0 + h) + 0.5 - cy)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (gx * c + gy * s) / radius, (-gx * s + gy * c) / radius
    if texture == "striped":
        return np.floor(u / 0.36).astype(np.int64) % 2 == 1
    if texture == "checkered":
        return (np.floor(u / 0.5).astype(np.int64) + np.floor(v / 0.5).astype(np.int64)) % 2 == 1
    if texture == "dotted":
        du, dv = u / 0.5 - np.round(u / 0.5), v / 0.5 - np.round(v / 0.5)
        return du * du + dv * dv <= 0.32 ** 2
    raise ValueError(f"texture is {texture!r}, expected one of {TEXTURES}")

"""Toyworld: deterministic synthetic videos with exact scene-graph ground truth.

Colored, textured shapes move in a 2.5-D world (`world`: depth lanes, wanderers,
travelers that enter and leave, riders carried on top of others, followers,
elastic collisions), are drawn far to near with hard edges (`draw`), so each
object's mask is exactly the pixels it shows, and relations are computed by
fixed rules from the trajectories and the masks (`relations`, whose docstring
states every predicate's rule and is the reference for evaluation).

    from data_gen.toyworld import generate_video
    record, frames = generate_video(seed=0, index=3)   # frames: uint8 [T, H, W, 3]

Objects: name = shape (circle, square, triangle, star, hexagon, diamond, cross);
attributes = [color, size, texture] with 8 colors, 3 sizes (small, medium, large)
and 4 textures (solid, striped, dotted, checkered). Videos last 4-40 s at 1-6 fps
(num_frames = duration * fps), 224-448 px a side; the record holds masks on the
~1 fps sampled frames. Video ids are f"toy-{seed}-{index:06d}"; one (seed, index)
always gives the same bytes.

- `generate_video` / `generate_with_scene`: the sampled frames (+ the scene).
- `render_all_frames`, `write_video_file`: every frame at the native fps, as an
  array or an .mp4 (PyAV), with the same record.
- `simulate` + `draw_frames`: any frames of a scene with their label maps.
- `python -m data_gen.toyworld --num-videos N --out DIR --seed S` writes shards.
"""
from data_gen.toyworld.generate import (draw_frames, generate_video, generate_with_scene, record_from_scene,
                                        render_all_frames, simulate, timestamps_of, write_video_file)
from data_gen.toyworld.relations import PREDICATES
from data_gen.toyworld.shapes import COLORS, SHAPES, SIZES, TEXTURES
from data_gen.toyworld.world import Scene, ToyworldConfig

__all__ = ["COLORS", "PREDICATES", "SHAPES", "SIZES", "Scene", "TEXTURES", "ToyworldConfig", "draw_frames",
           "generate_video", "generate_with_scene", "record_from_scene", "render_all_frames", "simulate",
           "timestamps_of", "write_video_file"]

"""From a simulated scene to a record and its frames (and an .mp4 for the generation pipeline)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_gen import rle
from data_gen.record import Object, Record, Video, sample_frame_indices
from data_gen.toyworld.draw import render_frame
from data_gen.toyworld.relations import compute_relations
from data_gen.toyworld.world import Scene, ToyworldConfig, sample_scene


def simulate(seed: int, index: int, **knobs) -> Scene:
    """The scene of video (seed, index): bodies, trajectories, contacts. Same inputs, same scene."""
    return sample_scene(int(seed), int(index), ToyworldConfig.from_knobs(**knobs))


def timestamps_of(frame_indices: list[int], fps: int) -> list[float]:
    return [round(f / fps, 6) for f in frame_indices]


def record_from_scene(scene: Scene, frame_indices: list[int], labels: np.ndarray, source: str) -> Record:
    """The record of a scene whose frames `frame_indices` were drawn with label maps `labels` [T, H, W]."""
    timestamps = timestamps_of(frame_indices, scene.fps)
    video = Video(id=scene.video_id, source=source, fps=float(scene.fps), num_frames=scene.num_frames,
                  width=scene.width, height=scene.height, frame_indices=list(frame_indices), timestamps=timestamps)
    objects = []
    for body in scene.bodies:
        drawn = [lab == body.index for lab in labels]
        if not any(m.any() for m in drawn):
            continue  # never seen on a sampled frame: not an object of this record
        masks = [rle.encode(m) if m.any() else rle.empty(scene.height, scene.width) for m in drawn]
        objects.append(Object(id=body.object_id, name=body.shape, attributes=[body.color, body.size, body.texture],
                              masks=masks, description=f"a {body.size} {body.color} {body.texture} {body.shape}"))
    relations = compute_relations(scene, list(frame_indices), timestamps, labels)
    return Record(video=video, objects=objects, relations=relations).validate()


def generate_video(seed: int, index: int, **knobs) -> tuple[Record, np.ndarray]:
    """Record and sampled frames (uint8 [T, H, W, 3]) of toyworld video (seed, index).

    Only the sampled frames (`record.sample_frame_indices`, ~1 fps) are drawn.
    Knobs: the fields of `ToyworldConfig` (object count, duration, fps, frame size)."""
    _, record, frames = generate_with_scene(seed, index, **knobs)
    return record, frames


def generate_with_scene(seed: int, index: int, **knobs) -> tuple[Scene, Record, np.ndarray]:
    """`generate_video` plus the scene behind it (trajectories, depths, contacts), for checks and debugging."""
    scene = simulate(seed, index, **knobs)
    frame_indices = sample_frame_indices(scene.num_frames, scene.fps)
    frames, labels = draw_frames(scene, frame_indices)
    record = record_from_scene(scene, frame_indices, labels, source=f"toyworld://{seed}/{index}")
    return scene, record, frames


def render_all_frames(seed: int, index: int, **knobs) -> tuple[Record, np.ndarray]:
    """Every frame at the native fps (uint8 [num_frames, H, W, 3]) and the record (masks on the sampled frames)."""
    scene = simulate(seed, index, **knobs)
    frames, labels = draw_frames(scene, range(scene.num_frames))
    sampled = sample_frame_indices(scene.num_frames, scene.fps)
    record = record_from_scene(scene, sampled, labels[sampled], source=f"toyworld://{seed}/{index}")
    return record, frames


def write_video_file(seed: int, index: int, path: str | Path, **knobs) -> Record:
    """Write the whole video (native fps) to `path` with PyAV and return its ground-truth record.

    An .mp4 gets H.264 (yuv420p, crf 18); other suffixes (.avi, .mkv) get MPEG-4
    Part 2. Lossy coding changes pixels, never the ground truth. The record's
    `video.source` is the path."""
    import av  # the generation extra; the rest of toyworld needs numpy only

    record, frames = render_all_frames(seed, index, **knobs)
    if record.video.width % 2 or record.video.height % 2:
        raise ValueError(f"video {record.video.id} is {record.video.width}x{record.video.height}: yuv420p "
                         "needs an even width and height (use an even side_step and min_side)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fps = int(record.video.fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if path.suffix == ".mp4" else "mpeg4", rate=fps)
        stream.width, stream.height = record.video.width, record.video.height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"} if path.suffix == ".mp4" else {}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    record.video.source = str(path)
    return record


def draw_frames(scene: Scene, frame_indices) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and label maps int16 [T, H, W] (body index = object id - 1; -1 background)."""
    frame_indices = list(frame_indices)
    frames = np.empty((len(frame_indices), scene.height, scene.width, 3), np.uint8)
    labels = np.empty((len(frame_indices), scene.height, scene.width), np.int16)
    for j, f in enumerate(frame_indices):
        frames[j], labels[j] = render_frame(scene, f)
    return frames, labels

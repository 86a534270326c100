"""One video = one serialized `tf.train.Example`: the payload of every shard format.

Features (all written, sorted by name):
  video_id      bytes       the record's video id (utf-8)
  record        bytes       Record.to_json()
  frames        bytes_list  the sampled frames, one encoded image each, in order
  frame_height  int64       height of the stored frames (after resizing)
  frame_width   int64       width of the stored frames
  image_format  bytes       b"jpeg" or b"png"

The same bytes go into ArrayRecord and TFRecord shards, so tf.data
(`tf.io.parse_single_example`), TFDS and our own reader all parse them.
"""
from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
from PIL import Image

from data_gen.record import Record, RecordError
from data_gen.shards.example_proto import decode_example, encode_example

IMAGE_FORMATS = ("jpeg", "png")


@dataclasses.dataclass
class Example:
    """One decoded payload: the record and its frames (decoded on first access)."""

    video_id: str
    record: Record
    encoded_frames: list[bytes]
    image_format: str
    frame_height: int
    frame_width: int

    @functools.cached_property
    def frames(self) -> np.ndarray:
        """uint8 [T, frame_height, frame_width, 3]."""
        out = np.zeros((len(self.encoded_frames), self.frame_height, self.frame_width, 3), np.uint8)
        for t, data in enumerate(self.encoded_frames):
            with Image.open(io.BytesIO(data)) as image:
                out[t] = np.asarray(image.convert("RGB"))
        return out


def stored_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) after shrinking so the longer side is at most max_side, aspect kept."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _check_frames(record: Record, frames: np.ndarray) -> None:
    frames = np.asarray(frames)
    v = record.video
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] != len(v.frame_indices):
        raise ValueError(f"frames has {frames.shape[0]} frames, video {v.id!r} has "
                         f"{len(v.frame_indices)} sampled frame indices")
    h, w = frames.shape[1:3]
    # Masks live at the video's size; frames may be smaller but must overlay them.
    if abs(h * v.width / v.height - w) > 1.0:
        raise ValueError(f"frames are {h}x{w} (HxW), not the aspect of video {v.id!r} ({v.height}x{v.width})")


def encode_frame(frame: np.ndarray, image_format: str, max_side: int, jpeg_quality: int) -> bytes:
    image = Image.fromarray(np.ascontiguousarray(frame))  # uint8 [H, W, 3] -> RGB
    h, w = stored_size(frame.shape[0], frame.shape[1], max_side)
    if (h, w) != frame.shape[:2]:
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if image_format == "jpeg":
        image.save(buf, "JPEG", quality=jpeg_quality)
    else:
        image.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def encode_payload(record: Record, frames: np.ndarray, *, image_format: str = "jpeg", max_side: int = 448,
                   jpeg_quality: int = 90) -> bytes:
    """Validate the record, resize and encode its frames, and serialize both."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format is {image_format!r}, expected one of {IMAGE_FORMATS}")
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    record.validate()
    frames = np.asarray(frames)
    _check_frames(record, frames)
    h, w = stored_size(frames.shape[1], frames.shape[2], max_side)
    return encode_example({
        "video_id": ("bytes", [record.video.id.encode("utf-8")]),
        "record": ("bytes", [record.to_json().encode("utf-8")]),
        "frames": ("bytes", [encode_frame(f, image_format, max_side, jpeg_quality) for f in frames]),
        "frame_height": ("int64", [h]),
        "frame_width": ("int64", [w]),
        "image_format": ("bytes", [image_format.encode("ascii")]),
    })


def decode_payload(data: bytes | memoryview) -> Example:
    features = decode_example(data)

    def one(name: str, kind: str):
        got_kind, values = features.get(name, (None, []))
        if got_kind != kind or len(values) != 1:
            raise RecordError(f"payload feature {name!r} must hold one {kind} value, got {got_kind} x{len(values)}")
        return values[0]

    kind, frames = features.get("frames", ("bytes", []))
    if kind not in ("bytes", None):
        raise RecordError(f"payload feature 'frames' must be a bytes list, got {kind}")
    video_id = one("video_id", "bytes").decode("utf-8")
    record = Record.from_json(one("record", "bytes"))
    if record.video.id != video_id:
        raise RecordError(f"payload video_id is {video_id!r} but its record's video.id is {record.video.id!r}")
    return Example(video_id=video_id, record=record,
                   encoded_frames=list(frames),
                   image_format=one("image_format", "bytes").decode("ascii"),
                   frame_height=int(one("frame_height", "int64")),
                   frame_width=int(one("frame_width", "int64")))

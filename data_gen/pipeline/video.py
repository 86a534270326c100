"""Stage 0: decode a video file with PyAV at its native rate, then sample it.

A file that cannot be decoded raises `VideoError` with the reason; the job turns
it into that video's error record and goes on with the next video.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_gen.record import sample_frame_indices


class VideoError(RuntimeError):
    """A video that cannot be used: missing, corrupt, unsupported or empty."""


@dataclass
class DecodedVideo:
    video_id: str
    source: str
    fps: float  # native frame rate
    num_frames: int  # native frame count
    frames: np.ndarray  # uint8 [N, H, W, 3], the kept frames (all of them unless decode.fps is set)
    frame_indices: list[int]  # native index of each kept frame

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


def video_id_for(path: str | Path) -> str:
    return Path(path).stem


def decode_video(path: str | Path, fps: float | None = None, max_frames: int | None = None,
                 video_id: str | None = None) -> DecodedVideo:
    """All frames of `path` as RGB uint8 (or about `fps` of them per second)."""
    import av  # the pipeline's decode dependency; imported here so numpy-only users never need it

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    kept: list[np.ndarray] = []
    indices: list[int] = []
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path.name}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            native_fps = float(rate) if rate else 0.0
            if not native_fps > 0:
                raise VideoError(f"{path.name}: the video stream has no frame rate")
            step = native_fps / fps if fps else 1.0
            for frame in container.decode(stream):
                # keep the first frame of every 1/fps slot
                if fps is None or count == 0 or int(count / step) > int((count - 1) / step):
                    if max_frames is not None and len(kept) == max_frames:
                        break  # the clip ends here: num_frames counts the frames up to this one
                    kept.append(frame.to_ndarray(format="rgb24"))
                    indices.append(count)
                count += 1
    except VideoError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as err:  # corrupt or unsupported data
        raise VideoError(f"{path.name}: cannot decode ({type(err).__name__}: {err}) after {count} frames") from err
    if not kept:
        raise VideoError(f"{path.name}: no frame could be decoded")
    shapes = {f.shape for f in kept}
    if len(shapes) != 1:
        raise VideoError(f"{path.name}: frame size changes mid-stream ({sorted(shapes)[:3]})")
    return DecodedVideo(video_id=video_id or video_id_for(path), source=str(path), fps=native_fps,
                        num_frames=count, frames=np.stack(kept), frame_indices=indices)


def record_positions(video: DecodedVideo, min_frames: int = 4, max_frames: int = 128) -> list[int]:
    """Positions (into the kept frames) of the record's ~1 fps sampled frames.

    TRASER's sampling picks native indices; each is snapped to the nearest kept frame."""
    wanted = sample_frame_indices(video.num_frames, video.fps, min_frames, max_frames)
    kept = np.asarray(video.frame_indices)
    return sorted({int(np.abs(kept - w).argmin()) for w in wanted})

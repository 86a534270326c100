"""What the benchmark converters share: where frames come from, box masks, the
converted-video container."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from data_gen.record import Record

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ConvertError(ValueError):
    """Benchmark input that does not follow its published format; the message names the file and field."""


@dataclass
class ConvertedVideo:
    """A benchmark video as a record, with its sampled frames loaded on demand."""

    record: Record
    load_frames: Callable[[], np.ndarray] | None  # -> uint8 [T, H, W, 3]; None: no frames were found
    frame_source: str  # where the frames come from, for messages


def numbered_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[int, Path]:
    """Files named by a frame number ("0007.png", "frame_000012.jpg") -> {number: path}."""
    out: dict[int, Path] = {}
    if not folder.is_dir():
        return out
    for path in folder.iterdir():
        if path.suffix.lower() not in suffixes:
            continue
        digits = re.findall(r"\d+", path.stem)
        if digits:
            out.setdefault(int(digits[-1]), path)
    return out


def read_rgb(path: Path, height: int, width: int) -> np.ndarray:
    """An image as uint8 [height, width, 3], resized (bilinear) when its size differs."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image, np.uint8)


def folder_frames(files: dict[int, Path], indices: list[int], height: int, width: int,
                  where: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        missing = [i for i in indices if i not in files]
        if missing:
            raise ConvertError(f"{where}: no image for sampled frame(s) {missing[:8]}")
        return np.stack([read_rgb(files[i], height, width) for i in indices])

    return load


def video_frames(path: Path, indices: list[int], height: int, width: int) -> Callable[[], np.ndarray]:
    """Frames `indices` of a video file, decoded in order with PyAV."""

    def load() -> np.ndarray:
        import av

        wanted = {f: k for k, f in enumerate(indices)}
        out = np.zeros((len(indices), height, width, 3), np.uint8)
        got = 0
        with av.open(str(path)) as container:
            for n, frame in enumerate(container.decode(video=0)):
                if n in wanted:
                    image = frame.to_image()
                    if image.size != (width, height):
                        image = image.resize((width, height), Image.Resampling.BILINEAR)
                    out[wanted[n]] = np.asarray(image.convert("RGB"))
                    got += 1
                    if got == len(indices):
                        break
        if got != len(indices):
            raise ConvertError(f"{path}: decoded {got} of {len(indices)} sampled frames (the video is shorter "
                               f"than its annotation's frame count?)")
        return out

    return load


def box_mask(height: int, width: int, box: dict, where: str) -> np.ndarray:
    """A VidOR/VidVRD box {xmin, ymin, xmax, ymax} (pixels, all inclusive) as a binary mask."""
    try:
        x0, y0, x1, y1 = (int(round(float(box[k]))) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{where}: bbox must hold numeric xmin, ymin, xmax, ymax, got {box!r}") from err
    mask = np.zeros((height, width), np.uint8)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(width - 1, x1), min(height - 1, y1)
    if x1 >= x0 and y1 >= y0:
        mask[y0:y1 + 1, x0:x1 + 1] = 1
    return mask


def readable(label: str) -> str:
    """Benchmark class names as words: "baby_seat" -> "baby seat", "Microwave_oven" -> "microwave oven"."""
    return " ".join(str(label).replace("_", " ").split()).lower()


def zero_based(files: dict[int, Path]) -> dict[int, Path]:
    """Frame folders extracted with ffmpeg number from 1 (%06d.jpg); frame indices start at 0."""
    if files and 0 not in files and min(files) == 1:
        return {k - 1: v for k, v in files.items()}
    return files

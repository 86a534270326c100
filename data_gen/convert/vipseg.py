"""VIPSeg (Miao et al., CVPR 2022) -> records: objects only, no relations.

Published layout (github.com/VIPSeg-Dataset/VIPSeg-Dataset README and
change2_720p.py): VIPSeg/imgs/<video>/<frame>.jpg (or images/ in the 720P
copy), VIPSeg/panomasks/<video>/<frame>.png, and panoVIPSeg_categories.json
([{"id": 0..123, "name", "isthing", "color"}]). A panomask pixel holds 0 for
void, the 1-based category id for stuff (value < 125, category id = value - 1)
and category * 100 + instance for things (value >= 125, category id =
value // 100 - 1; "person" is category 60, so its instances are 6100, 6101,
...), in a 16-bit single-channel PNG. Values are per video: one value, one
object (a stuff class is one region-object per video).

The annotated frames form the video (frame k = the k-th PNG in name order).
VIPSeg publishes no frame rate; `fps` (default 5, an assumption) only decides
which frames TRASER's ~1 fps sampling keeps, since there are no relations to
time. Objects are numbered 1.. by panoptic value.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_gen import rle
from data_gen.convert.frames import ConvertedVideo, ConvertError, folder_frames, numbered_files, readable
from data_gen.record import Object, Record, Video, sample_frame_indices

DEFAULT_FPS = 5.0
STUFF_LIMIT = 125  # panomask values below this are stuff classes


def decode_value(value: int) -> tuple[int, bool]:
    """A panomask value -> (0-based category id, is_thing)."""
    if value < STUFF_LIMIT:
        return value - 1, False
    return value // 100 - 1, True


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def load_categories(root: Path) -> dict[int, str]:
    path = root / "panoVIPSeg_categories.json"
    if not path.is_file():
        raise ConvertError(f"{root}: panoVIPSeg_categories.json is missing (it names the categories)")
    try:
        return {int(c["id"]): readable(c["name"]) for c in json.loads(path.read_text())}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{path}: expected a list of {{id, name, isthing, color}} ({err})") from None


def iter_videos(src: str | Path, fps: float = DEFAULT_FPS, split: str | None = None) -> Iterator[ConvertedVideo]:
    """Every video folder under panomasks/ (or those listed in <split>.txt), sorted by name."""
    root = Path(src)
    masks_root = _first_dir(root, ("panomasks", "panomask"))
    if masks_root is None:
        raise ConvertError(f"{root}: no panomasks/ folder")
    images_root = _first_dir(root, ("images", "imgs"))
    categories = load_categories(root)
    videos = sorted(p.name for p in masks_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if split is not None:
        listed = root / f"{split}.txt"
        if not listed.is_file():
            raise ConvertError(f"{root}: split {split!r} needs {listed}")
        keep = {line.strip() for line in listed.read_text().splitlines() if line.strip()}
        videos = [v for v in videos if v in keep]
    for video in videos:
        yield convert_video(video, masks_root / video, images_root / video if images_root else None,
                            categories, fps)


def convert_video(video_id: str, mask_dir: Path, image_dir: Path | None, categories: dict[int, str],
                  fps: float = DEFAULT_FPS) -> ConvertedVideo:
    files = [path for _, path in sorted(numbered_files(mask_dir, (".png",)).items())]
    if not files:
        raise ConvertError(f"{mask_dir}: no panomask PNG")
    indices = sample_frame_indices(len(files), fps)
    panoptic = []
    for f in indices:
        with Image.open(files[f]) as image:
            panoptic.append(np.asarray(image).astype(np.int64))
    height, width = panoptic[0].shape[:2]
    for f, frame in zip(indices, panoptic):
        if frame.ndim != 2 or frame.shape != (height, width):
            raise ConvertError(f"{files[f]}: expected a single-channel {height}x{width} panomask, got {frame.shape}")
    values = sorted(set(np.unique(np.stack(panoptic))) - {0})
    objects = []
    for number, value in enumerate(values, 1):
        category, _ = decode_value(int(value))
        if category not in categories:
            raise ConvertError(f"{mask_dir}: panomask value {value} decodes to category {category}, "
                               f"not in panoVIPSeg_categories.json")
        objects.append(Object(id=number, name=categories[category], attributes=[],
                              masks=[rle.encode(frame == value) for frame in panoptic]))
    record = Record(Video(id=video_id, source=f"vipseg/{video_id}", fps=fps, num_frames=len(files), width=width,
                          height=height, frame_indices=indices, timestamps=[f / fps for f in indices]),
                    objects, []).validate()
    load, source = None, "no images folder"
    if image_dir is not None:
        # An image shares its panomask's file name (<frame>.jpg next to <frame>.png).
        by_stem = {p.stem: p for p in image_dir.iterdir()} if image_dir.is_dir() else {}
        images = {k: by_stem.get(files[k].stem) for k in range(len(files))}
        images = {k: p for k, p in images.items() if p is not None}
        load, source = folder_frames(images, indices, height, width, str(image_dir)), str(image_dir)
    return ConvertedVideo(record, load, source)

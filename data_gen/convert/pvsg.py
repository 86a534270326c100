"""PVSG (Panoptic Video Scene Graph, Yang et al., CVPR 2023) -> records.

Published layout (github.com/LilyDaytoy/OpenPVSG README, after its
unzip_and_extract.py; the annotation tool's programs/pvsg_data_parsing.py
shows how pvsg.json is built):

    data/pvsg.json
    data/{vidor,epic_kitchen,ego4d}/frames/<video_id>/0000.png ...   (5 fps)
    data/{vidor,epic_kitchen,ego4d}/masks/<video_id>/0000.png ...    (palette PNG, pixel = object_id, 0 = void)

pvsg.json: {"objects": {"thing": [...], "stuff": [...]}, "relations": [...],
"split": {source: {"train": [ids], "val": [ids]}}, "data": [{"video_id",
"meta": {"num_frames", "width", "height", "fps": 5, ...}, "objects":
[{"object_id", "category", "is_thing", "status"}], "relations": [[subject_id,
object_id, predicate, [[start_frame, end_frame], ...]], ...]}]}. Relation frame
ranges are inclusive frame indices (the parser subtracts 1 from the exclusive
end it reads).

The record samples TRASER's ~1 fps frames from the 5 fps annotation, keeps
every object (its mask per sampled frame from the palette PNGs) and turns
frame ranges into seconds: [start / fps, end / fps].
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_gen import rle
from data_gen.convert.frames import ConvertedVideo, ConvertError, folder_frames, numbered_files, readable
from data_gen.record import Object, Record, Relation, Video, sample_frame_indices

DEFAULT_FPS = 5.0


def _annotation_path(src: Path) -> Path:
    path = src if src.is_file() else src / "pvsg.json"
    if not path.is_file():
        raise ConvertError(f"{src}: expected pvsg.json or a folder holding it")
    return path


def _video_folder(root: Path, kind: str, video_id: str) -> Path | None:
    """data/<source>/<kind>/<video_id>, or data/<kind>/<video_id>."""
    for candidate in [*sorted(root.glob(f"*/{kind}/{video_id}")), root / kind / video_id]:
        if candidate.is_dir():
            return candidate
    return None


def iter_videos(src: str | Path, split: str | None = None) -> Iterator[ConvertedVideo]:
    """Every video of pvsg.json (or of one split: "train" / "val"), in file order."""
    path = _annotation_path(Path(src))
    root = path.parent
    anno = json.loads(path.read_text())
    if "data" not in anno:
        raise ConvertError(f"{path}: no 'data' list of videos")
    keep = None
    if split is not None:
        known = {name for splits in anno.get("split", {}).values() for name in splits}
        if split not in known:
            raise ConvertError(f"{path}: split {split!r} is not in its 'split' table (has {sorted(known)})")
        keep = {vid for splits in anno["split"].values() for vid in splits.get(split, [])}
    for k, video in enumerate(anno["data"]):
        if keep is not None and video.get("video_id") not in keep:
            continue
        yield convert_video(video, root, where=f"{path}: data[{k}]")


def convert_video(video: dict, root: Path, where: str = "pvsg.json") -> ConvertedVideo:
    try:
        vid = str(video["video_id"])
        meta = video.get("meta", {})
        objects_info = video["objects"]
    except KeyError as err:
        raise ConvertError(f"{where}: missing field {err}") from None
    where = f"{where} ({vid})"
    mask_dir = _video_folder(root, "masks", vid)
    if mask_dir is None:
        raise ConvertError(f"{where}: no mask folder <source>/masks/{vid} under {root}")
    mask_files = numbered_files(mask_dir, (".png",))
    num_frames = int(meta.get("num_frames", meta.get("no_frames", len(mask_files))))
    fps = float(meta.get("fps", DEFAULT_FPS))
    if num_frames <= 0 or fps <= 0:
        raise ConvertError(f"{where}: meta.num_frames={num_frames}, meta.fps={fps} must be positive")
    height, width = int(meta.get("height", 0)), int(meta.get("width", 0))
    if not (height and width):
        if not mask_files:
            raise ConvertError(f"{where}: meta has no width/height and {mask_dir} has no PNG")
        with Image.open(next(iter(mask_files.values()))) as first:
            width, height = first.size
    indices = sample_frame_indices(num_frames, fps)
    try:
        ids = [int(o["object_id"]) for o in objects_info]
        names = [readable(o["category"]) for o in objects_info]
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{where}: objects must list {{object_id, category}} entries ({err})") from None
    masks: dict[int, list[dict]] = {oid: [] for oid in ids}
    for f in indices:
        if f in mask_files:
            with Image.open(mask_files[f]) as image:
                panoptic = np.asarray(image)  # palette index = object_id
            if panoptic.shape[:2] != (height, width):
                raise ConvertError(f"{mask_files[f]}: mask is {panoptic.shape[:2]}, meta says {(height, width)}")
        else:
            panoptic = np.zeros((height, width), np.uint8)  # an unannotated frame: every object absent
        for oid in ids:
            masks[oid].append(rle.encode(panoptic == oid))
    objects = [Object(id=oid, name=name, attributes=[], masks=masks[oid]) for oid, name in zip(ids, names)]
    relations = []
    duration_last = num_frames - 1
    for r, item in enumerate(video.get("relations") or []):
        try:
            s, o, predicate, ranges = item
            spans = [(min(int(a), duration_last) / fps, min(int(b), duration_last) / fps) for a, b in ranges]
        except (TypeError, ValueError) as err:
            raise ConvertError(f"{where}: relations[{r}] is not [subject, object, predicate, [[start, end], ...]]: "
                               f"{item!r}") from err
        if int(s) not in masks or int(o) not in masks:
            raise ConvertError(f"{where}: relations[{r}] refers to object {s} or {o}, not in objects")
        relations.append(Relation(int(s), readable(predicate), int(o), None, sorted(spans)))
    record = Record(Video(id=vid, source=f"pvsg/{mask_dir.parent.parent.name}/{vid}", fps=fps,
                          num_frames=num_frames, width=width, height=height, frame_indices=indices,
                          timestamps=[f / fps for f in indices]), objects, relations).validate()
    frame_dir = _video_folder(root, "frames", vid)
    load = None
    if frame_dir is not None:
        load = folder_frames(numbered_files(frame_dir), indices, height, width, str(frame_dir))
    return ConvertedVideo(record, load, str(frame_dir) if frame_dir else f"<source>/frames/{vid} (missing)")

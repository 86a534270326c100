"""VidOR (Shang et al., ICMR 2019) -> records.

Published format (xdshang.github.io/docs/vidor.html; VidVRD-helper's
dataset/README.md): one JSON per video under annotation/{training,validation}/
<group>/<video_id>.json:

    {"version", "video_id", "video_hash", "video_path": "1025/5159741010.mp4",
     "frame_count", "fps", "width", "height",
     "subject/objects": [{"tid": 0, "category": "bicycle"}, ...],
     "trajectories": [  # one list per frame, possibly empty
         [{"tid": 0, "bbox": {"xmin", "ymin", "xmax", "ymax"}, "generated": 0}, ...], ...],
     "relation_instances": [{"subject_tid", "object_tid", "predicate": "move_right",
                             "begin_fid": 0, "end_fid": 210}, ...]}   # end_fid exclusive

Boxes become box masks (pixel coordinates inclusive, as VidVRD-helper's
trajectories are). Underscored names become words ("next_to" -> "next to").
A relation over frames [begin, end) spans [begin / fps, (end - 1) / fps] s.
Frames come from a folder of extracted frames (<frames>/<video_path without
.mp4>/ or <frames>/<video_id>/, files named by frame number from 0, or from 1
as ffmpeg writes them) or from the video itself (<videos>/<video_path>, decoded with PyAV).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from data_gen import rle
from data_gen.convert.frames import (ConvertedVideo, ConvertError, box_mask, folder_frames, numbered_files,
                                     readable, video_frames, zero_based)
from data_gen.record import Object, Record, Relation, Video, sample_frame_indices


def iter_videos(src: str | Path, frames_dir: str | Path | None = None,
                videos_dir: str | Path | None = None) -> Iterator[ConvertedVideo]:
    """Every annotation JSON under `src` (or the one file `src`), sorted by path."""
    src = Path(src)
    files = [src] if src.is_file() else sorted(src.rglob("*.json"))
    if not files:
        raise ConvertError(f"{src}: no VidOR annotation JSON found")
    for path in files:
        try:
            anno = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConvertError(f"{path}: not valid JSON ({err.msg})") from None
        yield convert_video(anno, where=str(path), frames_dir=frames_dir, videos_dir=videos_dir)


def convert_video(anno: dict, where: str = "vidor", frames_dir: str | Path | None = None,
                  videos_dir: str | Path | None = None) -> ConvertedVideo:
    try:
        vid = str(anno["video_id"])
        num_frames, fps = int(anno["frame_count"]), float(anno["fps"])
        width, height = int(anno["width"]), int(anno["height"])
        entities = anno["subject/objects"]
        trajectories = anno["trajectories"]
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{where}: missing or bad field {err}") from None
    video_path = str(anno.get("video_path", f"{vid}.mp4"))
    indices = sample_frame_indices(num_frames, fps)
    try:
        tids = [int(e["tid"]) for e in entities]
        names = [readable(e["category"]) for e in entities]
    except (KeyError, TypeError, ValueError) as err:
        raise ConvertError(f"{where}: subject/objects must list {{tid, category}} entries ({err})") from None
    empty = rle.empty(height, width)
    masks: dict[int, list[dict]] = {tid: [] for tid in tids}
    for f in indices:
        try:
            boxes = {int(b["tid"]): b["bbox"] for b in (trajectories[f] if f < len(trajectories) else [])}
        except (KeyError, TypeError, ValueError) as err:
            raise ConvertError(f"{where}: trajectories[{f}] must list {{tid, bbox}} entries ({err})") from None
        for tid in tids:
            box = boxes.get(tid)
            masks[tid].append(rle.encode(box_mask(height, width, box, f"{where}: trajectories[{f}] tid {tid}"))
                              if box is not None else empty)
    objects = [Object(id=tid, name=name, attributes=[], masks=masks[tid]) for tid, name in zip(tids, names)]
    relations = []
    for k, r in enumerate(anno.get("relation_instances", [])):
        try:
            s, o = int(r["subject_tid"]), int(r["object_tid"])
            begin, end = int(r["begin_fid"]), min(int(r["end_fid"]), num_frames)
            predicate = readable(r["predicate"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConvertError(f"{where}: relation_instances[{k}] is malformed ({err}): {r!r}") from None
        if s not in masks or o not in masks:
            raise ConvertError(f"{where}: relation_instances[{k}] refers to tid {s} or {o}, not in subject/objects")
        last = max(begin, end - 1)  # end_fid is exclusive
        relations.append(Relation(s, predicate, o, None, [(begin / fps, last / fps)]))
    record = Record(Video(id=vid, source=video_path, fps=fps, num_frames=num_frames, width=width, height=height,
                          frame_indices=indices, timestamps=[f / fps for f in indices]),
                    objects, relations).validate()
    load, source = None, "no frames folder or video file found"
    stem = video_path.rsplit(".", 1)[0]
    if frames_dir is not None:
        for folder in (Path(frames_dir) / stem, Path(frames_dir) / vid):
            files = zero_based(numbered_files(folder))
            if files:
                load, source = folder_frames(files, indices, height, width, str(folder)), str(folder)
                break
    if load is None and videos_dir is not None and (Path(videos_dir) / video_path).is_file():
        path = Path(videos_dir) / video_path
        load, source = video_frames(path, indices, height, width), str(path)
    return ConvertedVideo(record, load, source)

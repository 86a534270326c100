"""SVG2 annotations in parquet (one row per video) <-> records.

The release's parquet schema is not documented where we can read it, so the
row schema follows the released per-video folder layout that
`data_gen.record.write_svg2_annotation` / `read_svg2_annotation` implement
(objects.json + relationships.json + masks/<frame>.json), flattened into
columns with the same field names:

    video_id: string, video_path: string, fps: double, num_frames: int64,
    width: int64, height: int64, sampled_frames: list<int64>, timestamps: list<double>,
    objects: list<struct<object_id: int64, label: string, attributes: list<string>,
                         description: string, uncertain: bool>>,
    relationships: list<struct<subject_id: int64, predicate: string, object_id: int64,
                               type: string, time_spans: list<list<double>>>>,
    masks: list<struct<frame: int64, object_id: int64, size: list<int64>, counts: string>>

`masks` lists one COCO RLE per (sampled source frame, object) where the object
is visible; absent ones are omitted, as in masks/<frame>.json. A nested column
stored as a JSON string (how many hub exports keep nested data) is read too.
Frames come from <frames>/<video_id>/ (files named by source frame number) or
the video file <videos>/<video_path>.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from data_gen import rle
from data_gen.convert.frames import (ConvertedVideo, ConvertError, folder_frames, numbered_files, video_frames,
                                     zero_based)
from data_gen.record import Object, Record, Relation, Video

COLUMNS = ("video_id", "video_path", "fps", "num_frames", "width", "height", "sampled_frames", "timestamps",
           "objects", "relationships", "masks")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("reading SVG2 parquet needs pyarrow: pip install 'traser-jax[eval]'") from err
    return pa, pq


def schema():
    pa, _ = _pyarrow()
    return pa.schema([
        ("video_id", pa.string()), ("video_path", pa.string()), ("fps", pa.float64()),
        ("num_frames", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
        ("sampled_frames", pa.list_(pa.int64())), ("timestamps", pa.list_(pa.float64())),
        ("objects", pa.list_(pa.struct([("object_id", pa.int64()), ("label", pa.string()),
                                        ("attributes", pa.list_(pa.string())), ("description", pa.string()),
                                        ("uncertain", pa.bool_())]))),
        ("relationships", pa.list_(pa.struct([("subject_id", pa.int64()), ("predicate", pa.string()),
                                              ("object_id", pa.int64()), ("type", pa.string()),
                                              ("time_spans", pa.list_(pa.list_(pa.float64())))]))),
        ("masks", pa.list_(pa.struct([("frame", pa.int64()), ("object_id", pa.int64()),
                                      ("size", pa.list_(pa.int64())), ("counts", pa.string())]))),
    ])


def record_to_row(record: Record) -> dict[str, Any]:
    record.validate()
    v = record.video
    masks = [{"frame": f, "object_id": o.id, "size": list(o.masks[j]["size"]), "counts": o.masks[j]["counts"]}
             for j, f in enumerate(v.frame_indices) for o in record.objects if rle.area(o.masks[j]) > 0]
    return {
        "video_id": v.id, "video_path": v.source, "fps": v.fps, "num_frames": v.num_frames, "width": v.width,
        "height": v.height, "sampled_frames": list(v.frame_indices), "timestamps": list(v.timestamps),
        "objects": [{"object_id": o.id, "label": o.name, "attributes": list(o.attributes),
                     "description": o.description, "uncertain": o.uncertain} for o in record.objects],
        "relationships": [{"subject_id": r.subject, "predicate": r.predicate, "object_id": r.object,
                           "type": r.category, "time_spans": [list(s) for s in r.spans]} for r in record.relations],
        "masks": masks,
    }


def write_svg2_parquet(records: Iterable[Record], path: str | Path) -> None:
    pa, pq = _pyarrow()
    table = pa.Table.from_pylist([record_to_row(r) for r in records], schema=schema())
    pq.write_table(table, path)


def _nested(row: dict, name: str, where: str) -> list:
    value = row.get(name)
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConvertError(f"{where}: column {name!r} holds a string that is not JSON ({err.msg})") from None
    if not isinstance(value, list):
        raise ConvertError(f"{where}: column {name!r} must be a list, got {type(value).__name__}")
    return value


def row_to_record(row: dict[str, Any], where: str = "row") -> Record:
    missing = [c for c in ("video_id", "fps", "num_frames", "width", "height", "sampled_frames") if row.get(c) is None]
    if missing:
        raise ConvertError(f"{where}: missing column(s) {missing}")
    vid = str(row["video_id"])
    where = f"{where} ({vid})"
    frames = [int(f) for f in row["sampled_frames"]]
    fps = float(row["fps"])
    height, width = int(row["height"]), int(row["width"])
    timestamps = [float(t) for t in row.get("timestamps") or [f / fps for f in frames]]
    position = {f: j for j, f in enumerate(frames)}
    objects_in = _nested(row, "objects", where)
    empty = rle.empty(height, width)
    masks = {int(o["object_id"]): [empty] * len(frames) for o in objects_in}
    for k, m in enumerate(_nested(row, "masks", where)):
        try:
            oid, frame = int(m["object_id"]), int(m["frame"])
            entry = {"size": [int(x) for x in m["size"]], "counts": m["counts"]}
        except (KeyError, TypeError, ValueError) as err:
            raise ConvertError(f"{where}: masks[{k}] needs frame, object_id, size, counts ({err})") from None
        if oid not in masks or frame not in position:
            raise ConvertError(f"{where}: masks[{k}] is for object {oid} on frame {frame}, not a listed object "
                               f"and sampled frame")
        masks[oid][position[frame]] = entry
    objects = [Object(id=int(o["object_id"]), name=str(o.get("label") or ""),
                      attributes=list(o.get("attributes") or []),
                      masks=masks[int(o["object_id"])], description=o.get("description"),
                      uncertain=bool(o.get("uncertain") or False)) for o in objects_in]
    relations = []
    for k, r in enumerate(_nested(row, "relationships", where)):
        try:
            relations.append(Relation(int(r["subject_id"]), str(r["predicate"]), int(r["object_id"]), r.get("type"),
                                      [(float(a), float(b)) for a, b in r["time_spans"]]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConvertError(f"{where}: relationships[{k}] is malformed ({err})") from None
    video = Video(id=vid, source=str(row.get("video_path") or vid), fps=fps, num_frames=int(row["num_frames"]),
                  width=width, height=height, frame_indices=frames, timestamps=timestamps)
    return Record(video, objects, relations).validate()


def parquet_files(src: Path) -> list[Path]:
    files = [src] if src.is_file() else sorted(src.rglob("*.parquet"))
    if not files:
        raise ConvertError(f"{src}: no .parquet file")
    return files


def iter_videos(src: str | Path, frames_dir: str | Path | None = None,
                videos_dir: str | Path | None = None) -> Iterator[ConvertedVideo]:
    _, pq = _pyarrow()
    for path in parquet_files(Path(src)):
        parquet = pq.ParquetFile(path)
        row_index = 0
        for batch in parquet.iter_batches(batch_size=16):
            for row in batch.to_pylist():
                record = row_to_record(row, where=f"{path} row {row_index}")
                row_index += 1
                yield ConvertedVideo(record, *_frames(record, frames_dir, videos_dir))


def _frames(record: Record, frames_dir, videos_dir):
    v = record.video
    if frames_dir is not None:
        files = zero_based(numbered_files(Path(frames_dir) / v.id))
        if files:
            folder = Path(frames_dir) / v.id
            return folder_frames(files, v.frame_indices, v.height, v.width, str(folder)), str(folder)
    if videos_dir is not None and (Path(videos_dir) / v.source).is_file():
        path = Path(videos_dir) / v.source
        return video_frames(path, v.frame_indices, v.height, v.width), str(path)
    return None, "no frames folder or video file found"

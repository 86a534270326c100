"""The video scene-graph record: the one contract of the project.

The generator writes it, training reads it, inference writes predictions in the
same form and evaluation compares two of them. Numpy alone: no torch, no jax.

A record holds the video's metadata and sampled frame indices, its objects
(name, attributes, a COCO RLE mask per sampled frame) and its relations (typed,
with inclusive [start, end] spans in seconds). Pixels live next to it in the
shards (`data_gen.shards`), not in the record.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from data_gen import rle as rle_lib

SCHEMA_VERSION = 1
CAMERA_ID = -1
CATEGORIES = ("spatial", "functional", "stateful", "motion", "social", "attentional", "event_level")


class RecordError(ValueError):
    """A record that breaks the schema; the message names the field and the value."""


@dataclass
class Video:
    id: str
    source: str
    fps: float
    num_frames: int
    width: int
    height: int
    frame_indices: list[int]  # indices into the source video of the sampled frames
    timestamps: list[float]  # seconds, one per sampled frame

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


@dataclass
class Object:
    id: int
    name: str
    attributes: list[str]
    masks: list[dict]  # COCO RLE per sampled frame; rle.empty(...) where absent
    description: str | None = None
    uncertain: bool = False

    def visible(self) -> list[bool]:
        return [rle_lib.area(m) > 0 for m in self.masks]

    def boxes(self) -> list[tuple[float, float, float, float] | None]:
        """[x0, y0, x1, y1] per sampled frame, derived from the masks; None where absent."""
        return [rle_lib.bbox(m) for m in self.masks]

    def first_last(self, video: Video) -> tuple[int, int] | None:
        """First and last source-frame index where the object is visible."""
        seen = [f for f, v in zip(video.frame_indices, self.visible()) if v]
        return (seen[0], seen[-1]) if seen else None


@dataclass
class Relation:
    subject: int
    predicate: str
    object: int  # CAMERA_ID (-1) is the camera
    category: str | None  # one of CATEGORIES; None when unknown (e.g. a model's prediction)
    spans: list[tuple[float, float]]  # inclusive [start, end] in seconds


@dataclass
class Record:
    video: Video
    objects: list[Object] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)

    # -- access ---------------------------------------------------------------
    def object_by_id(self) -> dict[int, Object]:
        return {o.id: o for o in self.objects}

    def masks_array(self, object_ids: Iterable[int] | None = None) -> np.ndarray:
        """Decoded masks, uint8 [num_objects, num_sampled_frames, H, W]."""
        objs = self.objects if object_ids is None else [self.object_by_id()[i] for i in object_ids]
        t, h, w = len(self.video.frame_indices), self.video.height, self.video.width
        out = np.zeros((len(objs), t, h, w), np.uint8)
        for i, o in enumerate(objs):
            for j, m in enumerate(o.masks):
                out[i, j] = rle_lib.decode(m)
        return out

    def visible_objects(self) -> list[Object]:
        """Objects with a non-empty mask on some sampled frame, in record order.

        This order defines the TRASER object numbering 1..K (model blocks and
        output JSON alike)."""
        return [o for o in self.objects if any(o.visible())]

    # -- validation -----------------------------------------------------------
    def validate(self) -> "Record":
        v = self.video
        if not v.id:
            raise RecordError(f"video.id must be non-empty, got {v.id!r}")
        if not (v.fps > 0 and math.isfinite(v.fps)):
            raise RecordError(f"video.fps must be positive, got {v.fps!r}")
        for name in ("num_frames", "width", "height"):
            if int(getattr(v, name)) <= 0:
                raise RecordError(f"video.{name} must be positive, got {getattr(v, name)!r}")
        if len(v.timestamps) != len(v.frame_indices):
            raise RecordError(
                f"video.timestamps has {len(v.timestamps)} entries, video.frame_indices has {len(v.frame_indices)}")
        for f in v.frame_indices:
            if not 0 <= f < v.num_frames:
                raise RecordError(f"video.frame_indices has {f}, outside [0, {v.num_frames})")
        if list(v.frame_indices) != sorted(set(v.frame_indices)):
            raise RecordError(f"video.frame_indices must be strictly increasing, got {list(v.frame_indices)[:16]}")
        ids = set()
        for o in self.objects:
            if o.id in ids:
                raise RecordError(f"objects: duplicate id {o.id}")
            if o.id == CAMERA_ID:
                raise RecordError(f"objects[id={o.id}].id: {CAMERA_ID} is reserved for the camera")
            ids.add(o.id)
            if not isinstance(o.name, str) or (o.name.strip() == "" and self._names_required()):
                raise RecordError(f"objects[id={o.id}].name must be a non-empty string, got {o.name!r}")
            if len(o.masks) != len(v.frame_indices):
                raise RecordError(
                    f"objects[id={o.id}].masks has {len(o.masks)} entries, expected one per sampled frame "
                    f"({len(v.frame_indices)})")
            for j, m in enumerate(o.masks):
                if list(m.get("size", [])) != [v.height, v.width]:
                    raise RecordError(
                        f"objects[id={o.id}].masks[{j}].size is {m.get('size')}, the video is "
                        f"[{v.height}, {v.width}] (height, width)")
        duration = v.duration
        for k, r in enumerate(self.relations):
            for role in ("subject", "object"):
                ref = getattr(r, role)
                if ref not in ids and not (role == "object" and ref == CAMERA_ID):
                    raise RecordError(f"relations[{k}].{role} refers to unknown object id {ref}")
            if not r.predicate or not r.predicate.strip():
                raise RecordError(f"relations[{k}].predicate must be non-empty, got {r.predicate!r}")
            if r.category is not None and r.category not in CATEGORIES:
                raise RecordError(f"relations[{k}].category is {r.category!r}, not one of {CATEGORIES}")
            if not r.spans:
                raise RecordError(f"relations[{k}].spans must hold at least one [start, end] span")
            for s, e in r.spans:
                if s > e:
                    raise RecordError(f"relations[{k}].spans has [{s}, {e}] with start > end")
                if s < 0 or e > duration:
                    raise RecordError(
                        f"relations[{k}].spans has [{s}, {e}], outside the video [0, {duration:g}] s")
        return self

    def _names_required(self) -> bool:
        # Stages 1-3 of generation write tracks before naming them: a record whose
        # objects are all unnamed is a valid "visual-only" record.
        return any(o.name.strip() for o in self.objects)

    # -- (de)serialization ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["schema_version"] = SCHEMA_VERSION
        for r in d["relations"]:
            r["spans"] = [list(s) for s in r["spans"]]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        version = d.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RecordError(f"schema_version is {version}, this code reads {SCHEMA_VERSION}")
        v = d["video"]
        video = Video(id=str(v["id"]), source=str(v["source"]), fps=float(v["fps"]),
                      num_frames=int(v["num_frames"]), width=int(v["width"]), height=int(v["height"]),
                      frame_indices=[int(i) for i in v["frame_indices"]],
                      timestamps=[float(t) for t in v["timestamps"]])
        objects = [Object(id=int(o["id"]), name=str(o["name"]), attributes=[str(a) for a in o["attributes"]],
                          masks=[{"size": [int(x) for x in m["size"]], "counts": m["counts"]} for m in o["masks"]],
                          description=o.get("description"), uncertain=bool(o.get("uncertain", False)))
                   for o in d.get("objects", [])]
        relations = [Relation(subject=int(r["subject"]), predicate=str(r["predicate"]), object=int(r["object"]),
                              category=r.get("category"), spans=[(float(s), float(e)) for s, e in r["spans"]])
                     for r in d.get("relations", [])]
        return cls(video=video, objects=objects, relations=relations)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Record":
        return cls.from_dict(json.loads(text))


def sample_frame_indices(num_frames: int, fps: float, min_frames: int = 4, max_frames: int = 128) -> list[int]:
    """TRASER's ~1 fps sampling: linspace(0, N-1, clip(round(duration_s), 4, 128))."""
    n = int(np.clip(round(num_frames / fps), min_frames, max_frames))
    n = min(n, num_frames)
    return sorted(set(int(i) for i in np.linspace(0, num_frames - 1, n).round().astype(int)))


# -- TRASER output JSON ------------------------------------------------------
# {"objects": [{"object 1": "person", "attributes": [...]}, ...],
#  "relationships": [[1, "riding", 2, [[0, 2]]], [1, "looking at", -1, [[2, 3]]]]}
# Objects are numbered 1..K in the order of Record.visible_objects(); spans are
# inclusive second indices of the 1 fps sampling.

def to_traser_json(record: Record) -> dict[str, Any]:
    order = [o.id for o in record.visible_objects()]
    number = {oid: k + 1 for k, oid in enumerate(order)}
    number[CAMERA_ID] = CAMERA_ID
    by_id = record.object_by_id()
    objects = [{f"object {number[oid]}": by_id[oid].name, "attributes": list(by_id[oid].attributes)} for oid in order]
    last_second = int(math.floor(record.video.duration))  # the last second index of the 1 fps sampling
    rels = []
    for r in record.relations:
        if r.subject not in number or r.object not in number:
            continue  # relation on an object never visible: it has no block in the model input
        spans = [[min(int(round(s)), last_second), min(int(round(e)), last_second)] for s, e in r.spans]
        rels.append([number[r.subject], r.predicate, number[r.object], spans])
    return {"objects": objects, "relationships": rels}


def from_traser_json(payload: dict[str, Any] | str, template: Record, *, strict: bool = True) -> Record:
    """A TRASER output JSON laid onto `template` (the video and object masks it was
    predicted from): names, attributes and relations come from the payload.

    strict=False keeps what is usable from an imperfect prediction (unknown
    object numbers, malformed entries are dropped) instead of raising."""
    if isinstance(payload, str):
        payload = json.loads(payload)
    order = [o.id for o in template.visible_objects()]
    by_number = {k + 1: oid for k, oid in enumerate(order)}
    by_number[CAMERA_ID] = CAMERA_ID
    names: dict[int, tuple[str, list[str]]] = {}
    for k, entry in enumerate(payload.get("objects", [])):
        try:
            key = next(key for key in entry if key.startswith("object "))
            number = int(key.split(" ", 1)[1])
            names[by_number[number]] = (str(entry[key]), [str(a) for a in entry.get("attributes", [])])
        except (StopIteration, ValueError, KeyError, TypeError, AttributeError) as err:
            if strict:
                raise RecordError(f"objects[{k}] is not a known 'object N' entry: {entry!r}") from err
    # Objects never visible have no block in the model input: they keep the template's labels.
    visible = set(order)
    objects = [dataclasses.replace(o, name=names.get(o.id, ("", []))[0], attributes=names.get(o.id, ("", []))[1])
               if o.id in visible else o for o in template.objects]
    relations = []
    for k, item in enumerate(payload.get("relationships", [])):
        try:
            s, pred, o, spans = item
            relations.append(Relation(subject=by_number[int(s)], predicate=str(pred), object=by_number[int(o)],
                                      category=None, spans=[(float(a), float(b)) for a, b in spans]))
        except (ValueError, KeyError, TypeError) as err:
            if strict:
                raise RecordError(f"relationships[{k}] is not [subject, predicate, object, spans]: {item!r}") from err
    return Record(video=template.video, objects=objects, relations=relations)


# -- The released SVG2 annotation layout --------------------------------------
# One folder per video: objects.json, relationships.json and masks/<frame>.json
# ({object_id: RLE} per sampled frame, absent objects omitted).

def write_svg2_annotation(record: Record, folder: str | Path) -> None:
    record.validate()
    folder = Path(folder)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    v = record.video
    meta = {"video_id": v.id, "video_path": v.source, "fps": v.fps, "num_frames": v.num_frames,
            "width": v.width, "height": v.height, "sampled_frames": v.frame_indices, "timestamps": v.timestamps}
    objects = [{"object_id": o.id, "label": o.name, "attributes": o.attributes, "description": o.description,
                "uncertain": o.uncertain} for o in record.objects]
    rels = [{"subject_id": r.subject, "predicate": r.predicate, "object_id": r.object, "type": r.category,
             "time_spans": [list(s) for s in r.spans]} for r in record.relations]
    (folder / "objects.json").write_text(json.dumps({"video": meta, "objects": objects}, indent=1))
    (folder / "relationships.json").write_text(json.dumps({"relationships": rels}, indent=1))
    for j, f in enumerate(v.frame_indices):
        masks = {str(o.id): o.masks[j] for o in record.objects if rle_lib.area(o.masks[j]) > 0}
        (folder / "masks" / f"{f:06d}.json").write_text(json.dumps(masks))


def read_svg2_annotation(folder: str | Path) -> Record:
    folder = Path(folder)
    objs = json.loads((folder / "objects.json").read_text())
    rels = json.loads((folder / "relationships.json").read_text())["relationships"]
    m = objs["video"]
    video = Video(id=m["video_id"], source=m["video_path"], fps=float(m["fps"]), num_frames=int(m["num_frames"]),
                  width=int(m["width"]), height=int(m["height"]), frame_indices=[int(i) for i in m["sampled_frames"]],
                  timestamps=[float(t) for t in m["timestamps"]])
    per_frame = [json.loads((folder / "masks" / f"{f:06d}.json").read_text()) for f in video.frame_indices]
    empty = rle_lib.empty(video.height, video.width)
    objects = [Object(id=int(o["object_id"]), name=o["label"], attributes=list(o["attributes"]),
                      masks=[frame.get(str(o["object_id"]), empty) for frame in per_frame],
                      description=o.get("description"), uncertain=bool(o.get("uncertain", False)))
               for o in objs["objects"]]
    relations = [Relation(subject=int(r["subject_id"]), predicate=r["predicate"], object=int(r["object_id"]),
                          category=r.get("type"), spans=[(float(a), float(b)) for a, b in r["time_spans"]])
                 for r in rels]
    return Record(video=video, objects=objects, relations=relations).validate()

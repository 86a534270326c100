"""Stage 6: relations from an LLM that sees the video at ~1 fps with each object's id, label and box.

Two calls per video, each with a strict JSON schema:
- spatial: depth-aware 3-D relations (in front of, behind, on top of, ...), no plain left/right;
- temporal: typed as functional, stateful, motion, social, attentional (the camera is id -1) or event_level.
Every relation carries one or more [start, end] spans in shown-frame ids; they are
checked against the video (ids known, start <= end, inside the frames shown) and
turned into seconds. Relations that fail a check are dropped and counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from data_gen.pipeline.config import RelationsConfig
from data_gen.pipeline.describe import data_url
from data_gen.pipeline.llm import LLMClient
from data_gen.record import CAMERA_ID, Record, Relation

TEMPORAL_CATEGORIES = ("functional", "stateful", "motion", "social", "attentional", "event_level")

_SPANS = {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}


def _schema(temporal: bool) -> dict:
    item = {"subject": {"type": "integer"}, "predicate": {"type": "string"}, "object": {"type": "integer"},
            "spans": _SPANS}
    if temporal:
        item["category"] = {"type": "string", "enum": list(TEMPORAL_CATEGORIES)}
    return {"type": "object", "additionalProperties": False, "required": ["relations"],
            "properties": {"relations": {"type": "array", "items": {
                "type": "object", "properties": item, "required": list(item), "additionalProperties": False}}}}


SPATIAL_SCHEMA = _schema(temporal=False)
TEMPORAL_SCHEMA = _schema(temporal=True)

_COMMON = ("You annotate a video scene graph. The video is shown as numbered frames at about one frame per "
           "second; after each frame comes a JSON line with the frame id, its time in seconds, its size and "
           "every visible object's id, label and box [x0, y0, x1, y1] in pixels. Refer to objects by id only. "
           "Each relation has one or more spans [first_frame_id, last_frame_id] (inclusive) when it holds.")
SPATIAL_PROMPT = (_COMMON + " List the SPATIAL relations between objects, reasoning in 3-D about depth and "
                  "support: e.g. in front of, behind, on top of, under, inside, leaning on, next to, far from. "
                  "Do not report plain image-plane left of / right of / above / below. "
                  "Return JSON {\"relations\": [{\"subject\", \"predicate\", \"object\", \"spans\"}]}.")
TEMPORAL_PROMPT = (_COMMON + " List the NON-SPATIAL relations, each with a category: functional (using, holding, "
                   "pushing), stateful (attached to, carried by, wearing), motion (moving toward, following, "
                   "passing), social (talking to, playing with), attentional (looking at, filming; object -1 is "
                   "the camera) or event_level (collides with, enters, exits, picks up). "
                   "Return JSON {\"relations\": [{\"subject\", \"predicate\", \"object\", \"spans\", \"category\"}]}.")


@dataclass
class RelationsResult:
    relations: list[Relation]
    dropped: int  # relations the model returned that failed a check


def shown_frames(num_frames: int, max_frames: int) -> list[int]:
    """Indices of the record frames shown to the model: all of them, evenly thinned beyond max_frames."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return sorted({int(i) for i in np.linspace(0, num_frames - 1, max_frames).round()})


def frame_context(record: Record, boxes: dict[int, list], j: int, frame_id: int) -> dict:
    """What the model reads after frame j: `boxes` maps object id -> box per record frame (None: absent)."""
    v = record.video
    objects = [{"id": o.id, "label": o.name, "bbox": [int(round(c)) for c in boxes[o.id][j]]}
               for o in record.objects if boxes[o.id][j] is not None]
    return {"frame_id": frame_id, "time_s": round(v.timestamps[j], 3), "width": v.width, "height": v.height,
            "objects": objects}


def _messages(prompt: str, record: Record, frames: np.ndarray, shown: list[int], max_side: int) -> list[dict]:
    boxes = {o.id: o.boxes() for o in record.objects}
    legend = ", ".join(f"{o.id}: {o.name}" for o in record.objects)
    content: list[dict] = [{"type": "text", "text": f"Objects: {legend}."}]
    for k, j in enumerate(shown):
        content.append({"type": "image_url", "image_url": {"url": data_url(frames[j], max_side)}})
        content.append({"type": "text", "text": json.dumps(frame_context(record, boxes, j, k), separators=(",", ":"))})
    return [{"role": "system", "content": prompt}, {"role": "user", "content": content}]


def _validated(items: list[dict], record: Record, shown: list[int], temporal: bool) -> RelationsResult:
    ids = {o.id for o in record.objects}
    times = [record.video.timestamps[j] for j in shown]
    merged: dict[tuple, list[tuple[float, float]]] = {}
    dropped = 0
    for item in items:
        s, o, pred = item["subject"], item["object"], " ".join(item["predicate"].split()).lower()
        spans = []
        ok = s in ids and (o in ids or o == CAMERA_ID) and s != o and bool(pred)
        for span in item["spans"]:
            if len(span) != 2 or not (0 <= span[0] <= span[1] < len(shown)):
                ok = False
                break
            spans.append((times[span[0]], times[span[1]]))
        if not ok or not spans:
            dropped += 1
            continue
        category = item["category"] if temporal else "spatial"
        key = (s, pred, o, category)
        merged[key] = sorted(set(merged.get(key, []) + spans))
    relations = [Relation(subject=s, predicate=p, object=o, category=c, spans=sp)
                 for (s, p, o, c), sp in merged.items()]
    return RelationsResult(relations, dropped)


def extract_relations(llm: LLMClient, cfg: RelationsConfig, record: Record, frames: np.ndarray) -> RelationsResult:
    """Stage 6 on one video: `record` holds the named objects, `frames` its sampled frames."""
    if not record.objects:
        return RelationsResult([], 0)
    shown = shown_frames(len(record.video.frame_indices), cfg.max_frames)
    out = RelationsResult([], 0)
    for prompt, schema, name, temporal in ((SPATIAL_PROMPT, SPATIAL_SCHEMA, "spatial_relations", False),
                                           (TEMPORAL_PROMPT, TEMPORAL_SCHEMA, "temporal_relations", True)):
        reply = llm.complete_json(
            "relations", model=cfg.model, schema_name=name, schema=schema,
            messages=_messages(prompt, record, frames, shown, cfg.image_max_side),
            temperature=cfg.temperature, max_tokens=cfg.max_tokens)
        part = _validated(reply["relations"], record, shown, temporal)
        out.relations += part.relations
        out.dropped += part.dropped
    return out

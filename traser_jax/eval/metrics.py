"""The paper's scene-graph metrics, numpy only (no jax, no torch).

Protocol (../shared/REFERENCE.md "Evaluation"): the model is given the ground
truth object trajectories, so predicted and ground-truth objects align by id.
Everything is compared in the TRASER output space: objects numbered 1..K in
`Record.visible_objects()` order (what `data_gen.record.to_traser_json`
writes and the model is trained to emit), relation spans as inclusive
second indices (a record's spans in seconds are rounded as `to_traser_json`
rounds them), -1 = the camera. A perfect model's output,
`to_traser_json(gt)`, scores 1.0 on every metric.

- object accuracy: a ground-truth object is correct if the prediction names the
  same number and the judge accepts the name.
- attribute recall: a ground-truth attribute is recalled if the judge accepts
  some predicted attribute of the same object.
- relation recall at tIoU > t (t = 0.5, 0.1): a ground-truth relation is
  recalled if a predicted relation on the same ordered pair (subject, object)
  has a predicate the judge accepts and temporal IoU > t. Each prediction
  matches at most one ground truth (duplicates cannot inflate recall): the
  recalled set is a maximum one-to-one matching (augmenting paths, ground truth
  in order, candidates by decreasing tIoU).
- triplet recall: the relation is recalled and both its objects are correct
  (the camera always counts as correct).

Temporal IoU: an inclusive span [s, e] of second indices covers the half-open
interval [s, e + 1) (second s through the end of second e, so [2, 2] is one
second long); a relation's spans are merged into their union first, and
IoU = |A n B| / |A u B| of the two unions.

Aggregation is micro: hits and totals are summed over all videos, then
divided. Per-video counts are kept, and 95% confidence intervals come from a
bootstrap over videos (resampling whole videos with replacement). A video with
no prediction counts every one of its ground-truth items as missed. A metric
with nothing to count (no ground-truth attributes, say) is None.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from data_gen.record import CAMERA_ID, CATEGORIES, Record, to_traser_json
from traser_jax.eval.judges import ExactJudge, Judge, is_match

THRESHOLDS = (0.5, 0.1)
METRICS = ("object_accuracy", "attribute_recall", "relation_recall_tiou0.5", "relation_recall_tiou0.1",
           "triplet_recall_tiou0.5", "triplet_recall_tiou0.1")
UNCATEGORIZED = "uncategorized"
# Which metrics each benchmark reports (the others are None): VIPSeg has no
# relations; only SVG2 annotates attributes.
BENCHMARK_METRICS = {
    "pvsg": ("object_accuracy",) + METRICS[2:],
    "vidor": ("object_accuracy",) + METRICS[2:],
    "vipseg": ("object_accuracy",),
    "svg2": METRICS,
}


class EvalInputError(ValueError):
    """Ground truth or predictions that cannot be evaluated; the message names the field."""


@dataclass
class GraphRelation:
    subject: int
    predicate: str
    object: int
    spans: list[tuple[int, int]]  # inclusive second indices
    category: str | None = None


@dataclass
class Graph:
    """One video's scene graph in TRASER numbering."""

    video_id: str
    objects: dict[int, tuple[str, list[str]]] = field(default_factory=dict)  # number -> (name, attributes)
    relations: list[GraphRelation] = field(default_factory=list)
    duration_s: float | None = None  # known for records; sets the baseline's whole-video span
    malformed: int = 0  # entries of the source JSON that were dropped


# -- parsing -------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def graph_from_traser_json(payload: Mapping[str, Any], video_id: str | None = None) -> Graph:
    """A TRASER output JSON (objects "object N", relationships [s, predicate, o, spans]) as a Graph.

    Tolerant, as predictions must be: a malformed entry is dropped and counted
    in `Graph.malformed`. An optional fifth relationship element is the
    relation category (used by ground-truth JSONL)."""
    if not isinstance(payload, Mapping):
        raise EvalInputError(f"a scene graph must be a JSON object, got {type(payload).__name__}")
    vid = str(video_id if video_id is not None else payload.get("video_id", ""))
    graph = Graph(video_id=vid)
    objects = payload.get("objects", [])
    for entry in objects if isinstance(objects, list) else []:
        number = name = None
        if isinstance(entry, Mapping):
            keys = [k for k in entry if isinstance(k, str) and k.startswith("object ")]
            if len(keys) == 1:
                tail = keys[0][len("object "):].strip()
                number = int(tail) if tail.lstrip("-").isdigit() else None
                name = entry[keys[0]]
        if number is None or not isinstance(name, str) or number in graph.objects:
            graph.malformed += 1
            continue
        attrs = entry.get("attributes", [])
        attrs = [a for a in attrs if isinstance(a, str)] if isinstance(attrs, list) else []
        graph.objects[number] = (name, attrs)
    if not isinstance(objects, list):
        graph.malformed += 1
    relations = payload.get("relationships", [])
    for item in relations if isinstance(relations, list) else []:
        rel = _parse_relation(item)
        if rel is None:
            graph.malformed += 1
        else:
            graph.relations.append(rel)
    if not isinstance(relations, list):
        graph.malformed += 1
    if "duration" in payload and isinstance(payload["duration"], (int, float)):
        graph.duration_s = float(payload["duration"])
    return graph


def _parse_relation(item) -> GraphRelation | None:
    if not isinstance(item, (list, tuple)) or len(item) not in (4, 5):
        return None
    s, pred, o, spans = item[:4]
    category = item[4] if len(item) == 5 else None
    if not (_is_int(s) and _is_int(o) and isinstance(pred, str) and isinstance(spans, list) and spans):
        return None
    if category is not None and not isinstance(category, str):
        return None
    parsed = []
    for span in spans:
        if not (isinstance(span, (list, tuple)) and len(span) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in span)):
            return None
        a, b = int(round(span[0])), int(round(span[1]))
        if a > b:
            return None
        parsed.append((a, b))
    return GraphRelation(int(s), pred, int(o), parsed, category)


def graph_from_record(record: Record) -> Graph:
    """A ground-truth record in TRASER numbering (`to_traser_json`), with relation categories."""
    payload = to_traser_json(record)
    number = {o.id: k + 1 for k, o in enumerate(record.visible_objects())}
    number[CAMERA_ID] = CAMERA_ID
    # to_traser_json keeps exactly the relations whose both ends have a number, in order.
    categories = [r.category for r in record.relations if r.subject in number and r.object in number]
    graph = graph_from_traser_json(payload, record.video.id)
    if graph.malformed or len(categories) != len(graph.relations):
        raise EvalInputError(f"video {record.video.id!r}: its record does not convert to a clean TRASER JSON "
                             f"({graph.malformed} malformed entries)")
    for rel, category in zip(graph.relations, categories):
        rel.category = category
    graph.duration_s = record.video.duration
    return graph


def as_graph(item: Any) -> Graph:
    """Record | Example (has .record) | record dict (has "video") | TRASER JSON dict with video_id."""
    if isinstance(item, Graph):
        return item
    if isinstance(item, Record):
        return graph_from_record(item)
    if hasattr(item, "record") and isinstance(item.record, Record):
        return graph_from_record(item.record)
    if isinstance(item, Mapping):
        if "video" in item:
            return graph_from_record(Record.from_dict(item))
        if "video_id" not in item:
            raise EvalInputError(f"a ground-truth scene graph needs a 'video_id' (keys: {sorted(item)[:8]})")
        return graph_from_traser_json(item)
    raise EvalInputError(f"cannot read a scene graph from {type(item).__name__}")


# -- temporal IoU ----------------------------------------------------------------------
def span_union(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive spans -> merged half-open intervals [s, e + 1)."""
    out: list[list[int]] = []
    for s, e in sorted((int(s), int(e) + 1) for s, e in spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def temporal_iou(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> float:
    ua, ub = span_union(a), span_union(b)
    inter = sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in ua for s2, e2 in ub)
    union = sum(e - s for s, e in ua) + sum(e - s for s, e in ub) - inter
    return inter / union if union > 0 else 0.0


def max_matching(candidates: list[list[int]]) -> list[int | None]:
    """Maximum one-to-one matching: candidates[g] lists the predictions g may take,
    in order of preference; returns the prediction matched to each g (or None)."""
    owner: dict[int, int] = {}

    def augment(g: int, seen: set[int]) -> bool:
        for p in candidates[g]:
            if p in seen:
                continue
            seen.add(p)
            if p not in owner or augment(owner[p], seen):
                owner[p] = g
                return True
        return False

    for g in range(len(candidates)):
        augment(g, set())
    matched: list[int | None] = [None] * len(candidates)
    for p, g in owner.items():
        matched[g] = p
    return matched


# -- per-video scoring -----------------------------------------------------------------------
def _pairs_to_judge(gt: Graph, pred: Graph | None, min_tiou: float) -> set[tuple[str, str]]:
    pairs: set[tuple[str, str]] = set()
    if pred is None:
        return pairs
    for number, (name, attrs) in gt.objects.items():
        if number in pred.objects:
            pname, pattrs = pred.objects[number]
            pairs.add((name, pname))
            pairs.update((a, p) for a in attrs for p in pattrs)
    for g in gt.relations:
        for p in pred.relations:
            if (p.subject, p.object) == (g.subject, g.object) and temporal_iou(g.spans, p.spans) > min_tiou:
                pairs.add((g.predicate, p.predicate))
    return pairs


def score_video(gt: Graph, pred: Graph | None, accept, thresholds=THRESHOLDS) -> dict[str, Any]:
    """Hit and total counts of one video; `accept(gt_text, pred_text) -> bool` is the judge's verdict."""
    correct = {CAMERA_ID: True}
    attr_hits = attr_total = 0
    for number, (name, attrs) in gt.objects.items():
        got = pred.objects.get(number) if pred is not None else None
        correct[number] = got is not None and accept(name, got[0])
        attr_total += len(attrs)
        if got is not None:
            attr_hits += sum(any(accept(a, p) for p in got[1]) for a in attrs)
    counts: dict[str, Any] = {
        "objects": len(gt.objects), "objects_correct": sum(correct[n] for n in gt.objects),
        "attributes": attr_total, "attributes_recalled": attr_hits, "relations": len(gt.relations),
        "prediction": pred is not None,
        "malformed_prediction_entries": pred.malformed if pred is not None else 0,
        "unknown_object_numbers": (sum(n not in gt.objects for n in pred.objects) if pred is not None else 0),
    }
    per_category: dict[str, dict[str, int]] = {}
    for rel in gt.relations:
        cat = per_category.setdefault(rel.category or UNCATEGORIZED, {"relations": 0})
        cat["relations"] += 1
    preds = pred.relations if pred is not None else []
    for t in thresholds:
        candidates = []
        for g in gt.relations:
            scored = [(temporal_iou(g.spans, p.spans), j) for j, p in enumerate(preds)
                      if (p.subject, p.object) == (g.subject, g.object)]
            scored = [(iou, j) for iou, j in scored if iou > t and accept(g.predicate, preds[j].predicate)]
            candidates.append([j for _, j in sorted(scored, key=lambda x: (-x[0], x[1]))])
        matched = max_matching(candidates)
        recalled = [m is not None for m in matched]
        triplet = [r and correct.get(g.subject, False) and correct.get(g.object, False)
                   for r, g in zip(recalled, gt.relations)]
        counts[f"relations_recalled_tiou{t}"] = sum(recalled)
        counts[f"triplets_recalled_tiou{t}"] = sum(triplet)
        for g, r, tr in zip(gt.relations, recalled, triplet):
            cat = per_category[g.category or UNCATEGORIZED]
            cat[f"relations_recalled_tiou{t}"] = cat.get(f"relations_recalled_tiou{t}", 0) + r
            cat[f"triplets_recalled_tiou{t}"] = cat.get(f"triplets_recalled_tiou{t}", 0) + tr
    counts["per_category"] = per_category
    return counts


def _metric_columns(thresholds) -> dict[str, tuple[str, str]]:
    cols = {"object_accuracy": ("objects_correct", "objects"),
            "attribute_recall": ("attributes_recalled", "attributes")}
    for t in thresholds:
        cols[f"relation_recall_tiou{t}"] = (f"relations_recalled_tiou{t}", "relations")
    for t in thresholds:
        cols[f"triplet_recall_tiou{t}"] = (f"triplets_recalled_tiou{t}", "relations")
    return cols


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def bootstrap_ci(num: np.ndarray, den: np.ndarray, samples: int, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile CI of sum(num)/sum(den) when videos are resampled with replacement."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if samples <= 0 or num.size == 0 or den.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(samples, num.size))
    d = den[idx].sum(axis=1)
    ratios = np.divide(num[idx].sum(axis=1), d, out=np.full(samples, np.nan), where=d > 0)
    lo, hi = np.nanpercentile(ratios, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


# -- the API ----------------------------------------------------------------------------------
def evaluate(gt: Iterable[Any], predictions: Iterable[Mapping] | Mapping[str, Mapping], *, judge: Judge | None = None,
             strict: bool = False, thresholds: tuple[float, ...] = THRESHOLDS, bootstrap: int = 1000,
             seed: int = 0, benchmark: str | None = None) -> dict[str, Any]:
    """Score predictions against ground truth (see the module docstring for the protocol).

    gt: Records, shard Examples, record dicts, or TRASER JSON dicts with a video_id.
    predictions: TRASER JSON dicts with a video_id, or a mapping video_id -> TRASER JSON.
    judge: decides label agreement (default ExactJudge); strict accepts only `identical`.
    Returns the metrics (fractions in [0, 1], None where nothing was counted),
    `per_category` recall, `ci95` bootstrap intervals, `counts` and `per_video`."""
    judge = judge or ExactJudge()
    if benchmark is not None and benchmark not in BENCHMARK_METRICS:
        raise EvalInputError(f"benchmark is {benchmark!r}, expected one of {tuple(BENCHMARK_METRICS)}")
    gt_graphs = [as_graph(item) for item in gt]
    seen: set[str] = set()
    for g in gt_graphs:
        if g.video_id in seen:
            raise EvalInputError(f"ground truth lists video_id {g.video_id!r} twice")
        seen.add(g.video_id)
    pred_graphs = _prediction_graphs(predictions)

    # Judge every needed pair in one call, so an LLM judge can batch them.
    min_t = min(thresholds)
    pairs = set()
    for g in gt_graphs:
        pairs |= _pairs_to_judge(g, pred_graphs.get(g.video_id), min_t)
    pair_list = sorted(pairs)
    verdict = {p: is_match(label, strict) for p, label in zip(pair_list, judge.judge(pair_list))}

    def accept(a: str, b: str) -> bool:
        return verdict[(a, b)]

    per_video = {g.video_id: score_video(g, pred_graphs.get(g.video_id), accept, thresholds) for g in gt_graphs}
    return _aggregate(per_video, thresholds, bootstrap, seed, benchmark, judge, strict,
                      extra_predictions=sorted(set(pred_graphs) - seen))


def _prediction_graphs(predictions) -> dict[str, Graph]:
    if isinstance(predictions, Mapping):
        items = [(str(vid), payload) for vid, payload in predictions.items()]
    else:
        items = []
        for k, payload in enumerate(predictions):
            if not isinstance(payload, Mapping) or "video_id" not in payload:
                raise EvalInputError(f"prediction {k} must be a JSON object with a 'video_id'")
            items.append((str(payload["video_id"]), payload))
    out: dict[str, Graph] = {}
    for vid, payload in items:
        if vid in out:
            raise EvalInputError(f"predictions list video_id {vid!r} twice")
        out[vid] = graph_from_traser_json(payload, vid)
    return out


def _aggregate(per_video: dict[str, dict], thresholds, bootstrap: int, seed: int, benchmark: str | None,
               judge: Judge, strict: bool, extra_predictions: list[str]) -> dict[str, Any]:
    columns = _metric_columns(thresholds)
    wanted = BENCHMARK_METRICS.get(benchmark, tuple(columns)) if benchmark else tuple(columns)
    videos = list(per_video.values())
    result: dict[str, Any] = {}
    ci: dict[str, Any] = {}
    for name, (num_key, den_key) in columns.items():
        num = np.array([v[num_key] for v in videos], np.float64)
        den = np.array([v[den_key] for v in videos], np.float64)
        if name not in wanted:
            result[name] = None
            continue
        result[name] = _ratio(num.sum(), den.sum())
        # One seed for all metrics: every metric sees the same resampled video sets.
        interval = bootstrap_ci(num, den, bootstrap, seed)
        ci[name] = list(interval) if interval is not None else None
    categories: dict[str, dict[str, Any]] = {}
    names = list(CATEGORIES) + [UNCATEGORIZED]
    if any(m.startswith("relation") for m in wanted):
        for cat in names:
            rows = [v["per_category"][cat] for v in videos if cat in v["per_category"]]
            total = sum(r["relations"] for r in rows)
            if not total:
                continue
            entry: dict[str, Any] = {"relations": total}
            for t in thresholds:
                entry[f"relation_recall_tiou{t}"] = _ratio(sum(r[f"relations_recalled_tiou{t}"] for r in rows), total)
                entry[f"triplet_recall_tiou{t}"] = _ratio(sum(r[f"triplets_recalled_tiou{t}"] for r in rows), total)
            categories[cat] = entry
    result["per_category"] = categories
    result["ci95"] = ci
    sums = Counter()
    for v in videos:
        for key, value in v.items():
            if key not in ("per_category", "prediction"):
                sums[key] += value
    result["counts"] = {"videos": len(videos), "videos_without_prediction": sum(not v["prediction"] for v in videos),
                        "predictions_without_ground_truth": len(extra_predictions), **dict(sums)}
    result["settings"] = {"judge": judge.name, "strict": strict, "aggregation": "micro over all videos",
                          "tiou_thresholds": list(thresholds), "bootstrap_samples": bootstrap, "seed": seed,
                          "benchmark": benchmark,
                          "span_convention": "inclusive second indices; [s, e] covers [s, e+1)"}
    report = judge.report()
    if report:
        result["judge_report"] = report
    result["per_video"] = per_video
    return result


# -- the most-frequent-relation baseline ---------------------------------------------------------
def most_frequent_relation_baseline(gt: Iterable[Any], train_gt: Iterable[Any]) -> list[dict[str, Any]]:
    """Predictions that give every ordered pair of ground-truth objects the training
    data's most frequent predicate over the whole video ([0, round(duration) - 1];
    without a known duration, up to the last second any ground-truth span reaches).
    Objects are named with the training data's most frequent name, no attributes.
    Ties break alphabetically so the baseline is deterministic."""
    predicates, names = Counter(), Counter()
    for item in train_gt:
        g = as_graph(item)
        predicates.update(r.predicate for r in g.relations)
        names.update(name for name, _ in g.objects.values())
    if not predicates:
        raise EvalInputError("the training ground truth has no relations to take the most frequent predicate from")
    top_predicate = min(predicates, key=lambda p: (-predicates[p], p))
    top_name = min(names, key=lambda n: (-names[n], n)) if names else "object"
    out = []
    for item in gt:
        g = as_graph(item)
        if g.duration_s is not None:
            last = max(0, int(round(g.duration_s)) - 1)
        else:
            last = max((e for r in g.relations for _, e in r.spans), default=0)
        numbers = sorted(g.objects)
        out.append({
            "video_id": g.video_id,
            "objects": [{f"object {n}": top_name, "attributes": []} for n in numbers],
            "relationships": [[s, top_predicate, o, [[0, last]]] for s in numbers for o in numbers if s != o],
        })
    return out

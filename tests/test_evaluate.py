"""Scene-graph metrics against values computed by hand (arithmetic in the comments)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from data_gen import rle
from data_gen.record import Object, Record, Relation, Video, to_traser_json
from traser_jax.eval.judges import Judge, Label
from traser_jax.eval.metrics import (EvalInputError, bootstrap_ci, evaluate, max_matching,
                                     most_frequent_relation_baseline, temporal_iou)
from traser_jax.evaluate import main

# -- a hand-scored pair --------------------------------------------------------------
# Video v1, ground truth (5th relationship element = category):
#   objects 1 man [red shirt, tall] | 2 dog [brown] | 3 ball [] | 4 bench [wooden]
#   R1 [1 walking 2   [0,3]]          motion
#   R2 [2 chasing 3   [2,5],[8,9]]    motion       (two spans)
#   R3 [1 looking at -1 [0,9]]        attentional  (the camera)
#   R4 [1 sitting on 4 [6,9]]         spatial
#   R5 [3 next to 2   [0,1]]          spatial
#   R6 [1 holding 3   [4,5]]          functional
GT_V1 = {
    "video_id": "v1",
    "objects": [{"object 1": "man", "attributes": ["red shirt", "tall"]},
                {"object 2": "dog", "attributes": ["brown"]},
                {"object 3": "ball", "attributes": []},
                {"object 4": "bench", "attributes": ["wooden"]}],
    "relationships": [[1, "walking", 2, [[0, 3]], "motion"],
                      [2, "chasing", 3, [[2, 5], [8, 9]], "motion"],
                      [1, "looking at", -1, [[0, 9]], "attentional"],
                      [1, "sitting on", 4, [[6, 9]], "spatial"],
                      [3, "next to", 2, [[0, 1]], "spatial"],
                      [1, "holding", 3, [[4, 5]], "functional"]],
}
# Video v2: no prediction at all -> 2 objects, 1 attribute, 1 relation missed.
GT_V2 = {
    "video_id": "v2",
    "objects": [{"object 1": "car", "attributes": ["red"]}, {"object 2": "person", "attributes": []}],
    "relationships": [[2, "driving", 1, [[0, 4]], "functional"]],
}
PRED_V1 = {
    "video_id": "v1",
    "objects": [{"object 1": "Men", "attributes": ["Red shirt", "short"]},  # men -> man: correct; red shirt hit
                {"object 2": "the dogs", "attributes": ["brown"]},  # correct; brown hit
                {"object 3": "frisbee", "attributes": ["round"]},  # wrong name
                {"object 5": "tree", "attributes": []},  # no such ground-truth object
                "not an object entry"],  # malformed: dropped
    # object 4 is missing: wrong, and its attribute "wooden" is missed
    "relationships": [
        [1, "walking", 2, [[1, 3]]],  # R1: pred [1,4) vs gt [0,4): 3/4 = 0.75
        [1, "walking", 2, [[0, 3]]],  # R1 again: a duplicate cannot recall a second relation
        [2, "chasing", 3, [[2, 9]]],  # R2: gt [2,6)+[8,10) = 6 s, pred [2,10) = 8 s, inter 6 -> 6/8 = 0.75
        [1, "looking at", -1, [[0, 2]]],  # R3: 3/10 = 0.3 -> recalled at 0.1 only
        [1, "sitting on", 4, [[6, 9]]],  # R4: IoU 1, but object 4 is wrong -> no triplet
        [2, "next to", 3, [[0, 1]]],  # R5 is 3 -> 2: wrong direction
        [1, "kicking", 3, [[4, 5]]],  # R6: predicate mismatch
        [1, "walking"],  # malformed: dropped
    ],
}


def test_hand_computed_metrics():
    result = evaluate([GT_V1, GT_V2], [PRED_V1], bootstrap=0)
    # objects: v1 man ok, dog ok, ball x, bench x (missing); v2 car x, person x -> 2/6
    assert result["object_accuracy"] == pytest.approx(2 / 6)
    # attributes: v1 red shirt ok, tall x, brown ok, wooden x; v2 red x -> 2/5
    assert result["attribute_recall"] == pytest.approx(2 / 5)
    # relations @0.5: R1, R2, R4 of 7 (6 in v1 + 1 in v2) -> 3/7; @0.1 adds R3 -> 4/7
    assert result["relation_recall_tiou0.5"] == pytest.approx(3 / 7)
    assert result["relation_recall_tiou0.1"] == pytest.approx(4 / 7)
    # triplets: R1 (man, dog both correct) at both; R2 has ball wrong; R4 has bench wrong;
    # R3 (man, camera) only where recalled, i.e. at 0.1 -> 1/7 and 2/7
    assert result["triplet_recall_tiou0.5"] == pytest.approx(1 / 7)
    assert result["triplet_recall_tiou0.1"] == pytest.approx(2 / 7)
    cats = result["per_category"]
    # motion: R1, R2 -> 2/2 at both; triplets: R1 only -> 1/2
    assert cats["motion"] == {"relations": 2, "relation_recall_tiou0.5": 1.0, "relation_recall_tiou0.1": 1.0,
                              "triplet_recall_tiou0.5": 0.5, "triplet_recall_tiou0.1": 0.5}
    # attentional: R3 -> 0/1 at 0.5, 1/1 at 0.1 (triplet too: camera counts as correct)
    assert cats["attentional"]["relation_recall_tiou0.5"] == 0.0
    assert cats["attentional"]["triplet_recall_tiou0.1"] == 1.0
    # spatial: R4 ok, R5 x -> 1/2; functional: R6 (v1) and v2's relation -> 0/2
    assert cats["spatial"]["relation_recall_tiou0.5"] == 0.5 and cats["spatial"]["triplet_recall_tiou0.5"] == 0.0
    assert cats["functional"] == {"relations": 2, "relation_recall_tiou0.5": 0.0, "relation_recall_tiou0.1": 0.0,
                                  "triplet_recall_tiou0.5": 0.0, "triplet_recall_tiou0.1": 0.0}
    counts = result["counts"]
    assert counts["videos"] == 2 and counts["videos_without_prediction"] == 1
    assert counts["malformed_prediction_entries"] == 2 and counts["unknown_object_numbers"] == 1
    assert result["per_video"]["v1"]["relations_recalled_tiou0.5"] == 3
    assert result["per_video"]["v2"]["objects_correct"] == 0


def test_duplicates_never_inflate_recall():
    gt = {"video_id": "a", "objects": [{"object 1": "cat", "attributes": []}, {"object 2": "mat", "attributes": []}],
          "relationships": [[1, "on", 2, [[0, 4]]]]}
    twice = dict(gt, relationships=[[1, "on", 2, [[0, 4]]], [1, "on", 2, [[0, 4]]]])
    # one ground truth, two identical predictions -> 1/1 (not 2/1)
    assert evaluate([gt], [twice], bootstrap=0)["relation_recall_tiou0.5"] == 1.0
    # two identical ground truths, one prediction -> 1/2
    assert evaluate([twice], [gt], bootstrap=0)["relation_recall_tiou0.5"] == 0.5
    # two identical ground truths, two predictions -> 2/2
    assert evaluate([twice], [twice], bootstrap=0)["relation_recall_tiou0.5"] == 1.0


def test_matching_is_maximum_not_greedy():
    # g0 [0,9], g1 [0,5]; p0 [0,7]: IoU(g0)=8/10=0.8, IoU(g1)=6/8=0.75; p1 [3,9]: IoU(g0)=7/10=0.7,
    # IoU(g1)=3/10=0.3. Greedy by IoU gives g0-p0 and strands g1 (1/2); the maximum matching is
    # g0-p1, g1-p0 (2/2).
    objs = [{"object 1": "man", "attributes": []}, {"object 2": "road", "attributes": []}]
    gt = {"video_id": "m", "objects": objs, "relationships": [[1, "on", 2, [[0, 9]]], [1, "on", 2, [[0, 5]]]]}
    pred = {"video_id": "m", "objects": objs, "relationships": [[1, "on", 2, [[0, 7]]], [1, "on", 2, [[3, 9]]]]}
    assert temporal_iou([(0, 9)], [(0, 7)]) == pytest.approx(0.8)
    assert temporal_iou([(0, 5)], [(0, 7)]) == pytest.approx(0.75)
    assert temporal_iou([(0, 5)], [(3, 9)]) == pytest.approx(0.3)
    assert evaluate([gt], [pred], bootstrap=0)["relation_recall_tiou0.5"] == 1.0
    assert max_matching([[0, 1], [0]]) == [1, 0]
    assert max_matching([[0], [0], [1]]) == [0, None, 1]


def test_temporal_iou_conventions():
    assert temporal_iou([(2, 2)], [(2, 2)]) == 1.0  # one second each
    assert temporal_iou([(0, 1)], [(2, 3)]) == 0.0  # adjacent, no overlap
    # overlapping spans of one relation merge: [0,3] u [2,5] = [0,6) -> vs [0,5]: 6/6
    assert temporal_iou([(0, 3), (2, 5)], [(0, 5)]) == 1.0
    # [0,9] vs [0,4],[6,9]: inter 5+4=9, union 10
    assert temporal_iou([(0, 9)], [(0, 4), (6, 9)]) == pytest.approx(0.9)


class _FixedJudge(Judge):
    """Labels from a table: a stand-in LLM with known answers."""

    name = "fixed"

    def __init__(self, table):
        self.table = table

    def _judge_unique(self, pairs):
        return [self.table.get(p, Label.MISMATCH) for p in pairs]


def test_lenient_and_strict_follow_the_judge():
    gt = {"video_id": "j", "objects": [{"object 1": "man", "attributes": ["crimson"]},
                                       {"object 2": "sofa", "attributes": []}],
          "relationships": [[1, "sitting on", 2, [[0, 3]]]]}
    pred = {"video_id": "j", "objects": [{"object 1": "person", "attributes": ["red"]},
                                         {"object 2": "couch", "attributes": []}],
            "relationships": [[1, "on", 2, [[0, 3]]]]}
    judge = _FixedJudge({("man", "person"): Label.HYPERNYM, ("crimson", "red"): Label.HYPERNYM,
                         ("sofa", "couch"): Label.SYNONYM, ("sitting on", "on"): Label.OVERLAP})
    lenient = evaluate([gt], [pred], judge=judge, bootstrap=0)
    assert lenient["object_accuracy"] == 1.0 and lenient["attribute_recall"] == 1.0
    assert lenient["triplet_recall_tiou0.5"] == 1.0
    strict = evaluate([gt], [pred], judge=judge, strict=True, bootstrap=0)
    assert strict["object_accuracy"] == 0.0 and strict["relation_recall_tiou0.5"] == 0.0
    assert strict["settings"]["strict"] is True and strict["settings"]["judge"] == "fixed"


def _record(video_id: str = "rec") -> Record:
    """10 s at 1 fps, 32x32; object 7 is never visible (it gets no TRASER number)."""
    h = w = 32
    frames = list(range(10))
    video = Video(id=video_id, source="synthetic", fps=1.0, num_frames=10, width=w, height=h,
                  frame_indices=frames, timestamps=[float(f) for f in frames])
    rng = np.random.default_rng(0)

    def masks(visible):
        out = []
        for t in frames:
            m = np.zeros((h, w), np.uint8)
            if visible(t):
                y, x = rng.integers(0, 20, size=2)
                m[y:y + 8, x:x + 8] = 1
            out.append(rle.encode(m))
        return out

    objects = [Object(3, "woman", ["green coat"], masks(lambda t: True)),
               Object(7, "ghost", [], masks(lambda t: False)),
               Object(5, "bicycle", ["blue"], masks(lambda t: t >= 2))]
    relations = [Relation(3, "riding", 5, "functional", [(2.4, 6.6)]),  # rounds to [2, 7]
                 Relation(3, "looking at", -1, "attentional", [(0.0, 1.2), (8.0, 9.0)]),
                 Relation(7, "near", 3, "spatial", [(0.0, 9.0)])]  # on an invisible object: no number
    return Record(video, objects, relations).validate()


def test_record_ground_truth_and_perfect_prediction():
    record = _record()
    perfect = dict(to_traser_json(record), video_id=record.video.id)
    # numbering follows visible_objects(): woman -> 1, bicycle -> 2; the ghost is dropped
    assert perfect["objects"][1] == {"object 2": "bicycle", "attributes": ["blue"]}
    result = evaluate([record], [perfect], bootstrap=50)
    for key in ("object_accuracy", "attribute_recall", "relation_recall_tiou0.5", "relation_recall_tiou0.1",
                "triplet_recall_tiou0.5", "triplet_recall_tiou0.1"):
        assert result[key] == 1.0, key
    assert result["counts"]["objects"] == 2 and result["counts"]["relations"] == 2
    assert set(result["per_category"]) == {"functional", "attentional"}
    # the same prediction laid on record ids by from_traser_json agrees with the numbering
    shifted = dict(perfect, relationships=[[1, "riding", 2, [[4, 7]]]])
    # riding: gt [2,7] = [2,8) 6 s vs [4,8) 4 s -> 4/6 > 0.5; looking at: missing -> 1/2
    assert evaluate([record], [shifted], bootstrap=0)["relation_recall_tiou0.5"] == 0.5


def test_bootstrap_interval():
    # identical videos: every resample has the same ratio
    assert bootstrap_ci(np.array([1, 1, 1]), np.array([2, 2, 2]), 200) == (0.5, 0.5)
    lo, hi = bootstrap_ci(np.array([0, 10]), np.array([10, 10]), 500, seed=1)
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    assert bootstrap_ci(np.array([0]), np.array([0]), 100) is None
    result = evaluate([GT_V1, GT_V2], [PRED_V1], bootstrap=300)
    lo, hi = result["ci95"]["object_accuracy"]
    # per-video accuracies are 2/4 and 0/2: any resample lies in [0, 0.5]
    assert 0.0 <= lo <= 2 / 6 <= hi <= 0.5


def test_benchmark_selects_metrics():
    result = evaluate([GT_V1], [PRED_V1], bootstrap=0, benchmark="vipseg")
    assert result["object_accuracy"] == 0.5
    assert result["relation_recall_tiou0.5"] is None and result["per_category"] == {}
    assert evaluate([GT_V1], [PRED_V1], bootstrap=0, benchmark="vidor")["attribute_recall"] is None
    with pytest.raises(EvalInputError, match="benchmark"):
        evaluate([GT_V1], [PRED_V1], benchmark="coco")


def test_most_frequent_relation_baseline():
    dogs = [{"object 1": "dog", "attributes": []}, {"object 2": "dog", "attributes": []}]
    train = [{"video_id": "t", "objects": dogs,
              "relationships": [[1, "on", 2, [[0, 1]]]] * 3 + [[2, "holding", 1, [[0, 1]]]]}]
    record = _record("eval")
    preds = most_frequent_relation_baseline([record], train)
    # 2 numbered objects -> 2 ordered pairs, whole video = [0, round(10 s) - 1]
    assert preds == [{"video_id": "eval",
                      "objects": [{"object 1": "dog", "attributes": []}, {"object 2": "dog", "attributes": []}],
                      "relationships": [[1, "on", 2, [[0, 9]]], [2, "on", 1, [[0, 9]]]]}]
    gt = {"video_id": "b", "duration": 10,
          "objects": [{"object 1": "cat", "attributes": []}, {"object 2": "mat", "attributes": []},
                      {"object 3": "box", "attributes": []}],
          "relationships": [[1, "on", 2, [[0, 9]]], [2, "holding", 3, [[0, 9]]], [1, "on", 3, [[0, 2]]]]}
    result = evaluate([gt], most_frequent_relation_baseline([gt], train), bootstrap=0)
    # "on" over [0,9]: 1->2 IoU 1; 2->3 wrong predicate; 1->3 IoU 3/10 -> 1/3 at 0.5, 2/3 at 0.1
    assert result["relation_recall_tiou0.5"] == pytest.approx(1 / 3)
    assert result["relation_recall_tiou0.1"] == pytest.approx(2 / 3)


def test_bad_inputs_name_the_problem():
    with pytest.raises(EvalInputError, match="video_id"):
        evaluate([{"objects": []}], [])
    with pytest.raises(EvalInputError, match="twice"):
        evaluate([GT_V1, GT_V1], [])
    with pytest.raises(EvalInputError, match="prediction 0"):
        evaluate([GT_V1], [{"objects": []}])


def test_cli_with_shards_and_jsonl(tmp_path):
    from data_gen.shards import ShardWriter

    record = _record()
    with ShardWriter(tmp_path / "gt", records_per_shard=4) as writer:
        writer.write(record, np.zeros((10, 32, 32, 3), np.uint8))
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps(dict(to_traser_json(record), video_id=record.video.id)) + "\n")
    out = tmp_path / "m.json"
    assert main(["--gt", str(tmp_path / "gt"), "--pred", str(pred), "--out", str(out), "--bootstrap", "20"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["object_accuracy"] == 1.0 and metrics["relation_recall_tiou0.5"] == 1.0
    assert metrics["ci95"]["object_accuracy"] == [1.0, 1.0]
    # JSONL ground truth, with the baseline, in a fresh interpreter that must not load jax
    gt = tmp_path / "gt.jsonl"
    gt.write_text("\n".join(json.dumps(g) for g in (GT_V1, GT_V2)) + "\n")
    pred.write_text(json.dumps(PRED_V1) + "\n")
    code = ("import sys; from traser_jax.evaluate import main; "
            f"rc = main(['--gt', {str(gt)!r}, '--pred', {str(pred)!r}, '--out', {str(out)!r}, "
            f"'--baseline-train', {str(gt)!r}]); "
            "assert 'jax' not in sys.modules, 'evaluate imported jax'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "relation_recall_tiou0.5" in run.stdout and "motion" in run.stdout
    metrics = json.loads(out.read_text())
    assert metrics["triplet_recall_tiou0.1"] == pytest.approx(2 / 7)
    assert 0.0 <= metrics["baseline_relation_recall_tiou0.5"] <= 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["--gt", str(gt), "--pred", str(bad)]) == 2

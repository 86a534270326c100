"""The record: RLE bytes equal pycocotools', round trips, and every validation error."""
import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from data_gen import rle
from data_gen.record import (CAMERA_ID, Object, Record, RecordError, Relation, Video, from_traser_json,
                             read_svg2_annotation, sample_frame_indices, to_traser_json, write_svg2_annotation)


def make_record(seed=0, h=24, w=32, t=5, num_objects=3):
    rng = np.random.default_rng(seed)
    video = Video(id=f"v{seed}", source="synthetic", fps=2.0, num_frames=2 * t, width=w, height=h,
                  frame_indices=list(range(0, 2 * t, 2)), timestamps=[float(i) for i in range(t)])
    objects = []
    for k in range(num_objects):
        masks = []
        for j in range(t):
            m = np.zeros((h, w), np.uint8)
            if not (k == 2 and j == 0):  # object 2 enters late
                y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
                m[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = 1
            masks.append(rle.encode(m))
        objects.append(Object(id=10 + k, name=["circle", "square", "star"][k], attributes=["red", f"size{k}"],
                              masks=masks, description=f"object {k}", uncertain=k == 1))
    relations = [
        Relation(10, "moving toward", 11, "motion", [(0.0, 2.0)]),
        Relation(11, "behind", 12, "spatial", [(1.0, 1.0), (3.0, 4.0)]),
        Relation(12, "looking at", CAMERA_ID, "attentional", [(2.0, 5.0)]),
    ]
    return Record(video, objects, relations).validate()


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 33)])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.9, 1.0])
def test_rle_matches_pycocotools(shape, density):
    m = (np.random.default_rng(hash((shape, density)) % 2**32).random(shape) < density).astype(np.uint8)
    ours = rle.encode(m)
    theirs = coco_mask.encode(np.asfortranarray(m))
    assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(theirs["size"])
    np.testing.assert_array_equal(rle.decode(ours), m)
    np.testing.assert_array_equal(rle.decode(theirs), m)  # bytes counts accepted too
    assert rle.area(ours) == int(m.sum())
    if m.any():
        ys, xs = np.nonzero(m)
        assert rle.bbox(ours) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    else:
        assert rle.bbox(ours) is None


def test_rle_rejects_wrong_sum():
    with pytest.raises(ValueError, match="counts sum"):
        rle.decode({"size": [2, 2], "counts": [1, 2]})


def test_record_json_round_trip():
    rec = make_record()
    back = Record.from_json(rec.to_json())
    assert back.to_dict() == rec.to_dict()
    assert json.loads(rec.to_json())["schema_version"] == 1


def test_derived_boxes_and_first_last():
    rec = make_record()
    obj = rec.objects[2]
    boxes = obj.boxes()
    assert boxes[0] is None and all(b is not None for b in boxes[1:])
    m = rle.decode(obj.masks[1])
    ys, xs = np.nonzero(m)
    assert boxes[1] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert obj.first_last(rec.video) == (2, 8)
    assert rec.masks_array().shape == (3, 5, 24, 32)


def test_traser_json_round_trip():
    rec = make_record()
    payload = to_traser_json(rec)
    assert payload["objects"][0] == {"object 1": "circle", "attributes": ["red", "size0"]}
    assert payload["relationships"][2] == [3, "looking at", -1, [[2, 5]]]
    back = from_traser_json(json.dumps(payload), rec)
    assert [(o.id, o.name, o.attributes) for o in back.objects] == [(o.id, o.name, o.attributes) for o in rec.objects]
    assert [(r.subject, r.predicate, r.object, r.spans) for r in back.relations] == \
        [(r.subject, r.predicate, r.object, r.spans) for r in rec.relations]
    assert to_traser_json(back) == payload


def test_traser_json_numbers_skip_invisible_objects():
    rec = make_record()
    rec.objects[0].masks = [rle.empty(24, 32)] * 5
    rec.relations = [r for r in rec.relations if r.subject != 10]
    payload = to_traser_json(rec)
    assert [list(o)[0] for o in payload["objects"]] == ["object 1", "object 2"]
    assert payload["objects"][0]["object 1"] == "square"
    assert payload["relationships"][0][:3] == [1, "behind", 2]


def test_traser_json_lenient_drops_bad_entries():
    rec = make_record()
    payload = {"objects": [{"object 9": "x"}, {"object 1": "circle", "attributes": []}],
               "relationships": [[1, "near", 7, [[0, 1]]], [1, "near"], [1, "near", 2, [[0, 1]]]]}
    with pytest.raises(RecordError, match="objects\\[0\\]"):
        from_traser_json(payload, rec)
    back = from_traser_json(payload, rec, strict=False)
    assert back.objects[0].name == "circle" and len(back.relations) == 1


def test_svg2_layout_round_trip(tmp_path):
    rec = make_record()
    write_svg2_annotation(rec, tmp_path / "v0")
    assert sorted(p.name for p in (tmp_path / "v0" / "masks").iterdir())[0] == "000000.json"
    assert read_svg2_annotation(tmp_path / "v0").to_dict() == rec.to_dict()


@pytest.mark.parametrize("breaks, message", [
    (lambda r: setattr(r.relations[0], "object", 99), r"relations\[0\]\.object refers to unknown object id 99"),
    (lambda r: setattr(r.relations[0], "subject", -1), r"relations\[0\]\.subject refers to unknown object id -1"),
    (lambda r: setattr(r.relations[1], "spans", [(3.0, 2.0)]), r"relations\[1\]\.spans has \[3.0, 2.0\] with start > end"),
    (lambda r: setattr(r.relations[1], "spans", [(1.0, 5.5)]), r"relations\[1\]\.spans has \[1.0, 5.5\], outside the video \[0, 5\] s"),
    (lambda r: setattr(r.relations[1], "spans", [(-1.0, 2.0)]), r"outside the video"),
    (lambda r: setattr(r.relations[0], "category", "romantic"), r"relations\[0\]\.category is 'romantic'"),
    (lambda r: r.objects[1].masks.__setitem__(2, rle.empty(24, 31)),
     r"objects\[id=11\]\.masks\[2\]\.size is \[24, 31\], the video is \[24, 32\]"),
    (lambda r: setattr(r.objects[2], "id", 10), r"objects: duplicate id 10"),
    (lambda r: setattr(r.objects[1], "name", "  "), r"objects\[id=11\]\.name must be a non-empty string, got '  '"),
    (lambda r: r.objects[0].masks.pop(), r"objects\[id=10\]\.masks has 4 entries"),
    (lambda r: setattr(r.video, "fps", 0.0), r"video\.fps must be positive, got 0.0"),
    (lambda r: setattr(r.video, "frame_indices", [0, 2, 4, 6, 10]), r"video\.frame_indices has 10, outside \[0, 10\)"),
])
def test_validation_names_field_and_value(breaks, message):
    rec = make_record()
    breaks(rec)
    with pytest.raises(RecordError, match=message):
        rec.validate()


def test_visual_only_record_may_have_empty_names():
    rec = make_record()
    for o in rec.objects:
        o.name, o.attributes = "", []
    rec.relations = []
    rec.validate()


def test_sample_frame_indices_follow_traser_rule():
    assert sample_frame_indices(300, 30.0) == list(np.linspace(0, 299, 10).round().astype(int))
    assert len(sample_frame_indices(60, 30.0)) == 4  # 2 s -> clipped up to 4 frames
    assert len(sample_frame_indices(30 * 600, 30.0)) == 128  # 600 s -> clipped to 128
    assert sample_frame_indices(3, 1.0) == [0, 1, 2]  # never more frames than the video has


def test_traser_json_spans_stay_inside_the_last_second():
    rec = make_record()  # 5 s video: second indices 0..5
    rec.video.num_frames, rec.video.fps = 9, 2.0  # 4.5 s: an end of 4.5 s would round to 5 (past the end)
    rec.relations = [Relation(10, "near", 11, "spatial", [(4.4, 4.5)])]
    rec.validate()
    assert to_traser_json(rec)["relationships"][0][3] == [[4, 4]]


def test_from_traser_json_keeps_labels_of_never_visible_objects():
    rec = make_record()
    rec.objects[0].masks = [rle.empty(24, 32)] * 5
    payload = {"objects": [{"object 1": "box", "attributes": ["blue"]}, {"object 2": "ball", "attributes": []}],
               "relationships": []}
    back = from_traser_json(payload, rec).validate()
    assert [o.name for o in back.objects] == ["circle", "box", "ball"]

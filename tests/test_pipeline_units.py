"""Pure pieces of the generation pipeline: config, decode errors, stage logic on hand-made masks."""
import numpy as np
import pytest

from data_gen import rle
from data_gen.pipeline import cleanup, proposals, tracking
from data_gen.pipeline.config import ConfigError, load_config
from data_gen.pipeline.llm import price_of, request_key
from data_gen.pipeline.parse import _normalize
from data_gen.pipeline.llm import MalformedReply
from data_gen.pipeline.relations import _validated, shown_frames
from data_gen.pipeline.video import VideoError, decode_video, record_positions
from data_gen.record import Object, Record, Video


def disc(h, w, cy, cx, r):
    yy, xx = np.ogrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_config_defaults_are_the_released_settings():
    cfg = load_config()
    p, t, c = cfg.proposals, cfg.tracking, cfg.cleanup
    assert (p.frame_stride, p.point_grids, p.crop_n_layers, p.points_per_batch) == (20, [32, 16, 4], 2, 64)
    assert (p.pred_iou_thresh, p.stability_score_thresh, p.box_nms_thresh, p.crop_nms_thresh) == (0.75, 0.85, 0.7, 0.7)
    assert (p.crop_overlap_ratio, p.min_mask_region_area, p.use_m2m, p.max_covered) == (0.5, 200, True, 0.9)
    assert (t.min_untracked, t.belongs, t.new_object_untracked, t.max_objects, t.offline_replay) == (
        0.05, 0.9, 0.1, 65, True)
    assert (c.contained, c.contained_frames, c.min_cooccurring, c.opening, c.min_area) == (0.9, 0.7, 5, 3, 32)
    d = cfg.describe
    assert (d.max_objects, d.frames_per_object, d.temperature, d.top_p, d.max_tokens) == (40, 8, 0.2, 0.5, 512)
    assert cfg.sam2.config.endswith("sam2.1_hiera_l.yaml") and cfg.sam2.image_size == 1024


def test_config_errors_name_the_key_and_value():
    with pytest.raises(ConfigError, match="sam2.image_size"):
        load_config(overrides=["sam2.imagesize=256"])
    with pytest.raises(ConfigError, match="multiple of 32, got 100"):
        load_config(overrides=["sam2.image_size=100"])
    with pytest.raises(ConfigError, match="one grid per crop layer"):
        load_config(overrides=["proposals.point_grids=[8]"])
    with pytest.raises(ConfigError, match="'tracking.max_objects': cannot read 'many'"):
        load_config(overrides=["tracking.max_objects=many"])
    assert load_config(overrides=["decode.fps=2", "llm.base_url=http://h:1/v1"]).decode.fps == 2.0


def test_decode_errors_become_video_errors(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        decode_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(VideoError, match="bad.mp4: cannot decode"):
        decode_video(bad)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoError, match="notes.mp4"):
        decode_video(text)


def test_decode_samples_and_record_positions(tmp_path):
    from data_gen.toyworld import write_video_file

    rec = write_video_file(5, 0, tmp_path / "v.mp4", min_duration=6, max_duration=6, fps_choices=[4],
                           max_side=224)
    video = decode_video(tmp_path / "v.mp4")
    assert video.num_frames == rec.video.num_frames == 24 and video.fps == 4.0
    assert video.frames.shape == (24, rec.video.height, rec.video.width, 3)
    assert [video.frame_indices[p] for p in record_positions(video)] == rec.video.frame_indices
    half = decode_video(tmp_path / "v.mp4", fps=2)
    assert half.num_frames == 24 and half.frame_indices == list(range(0, 24, 2))
    first = decode_video(tmp_path / "v.mp4", max_frames=5)
    assert first.frames.shape[0] == 5 and first.num_frames == 5
    assert decode_video(tmp_path / "v.mp4", fps=2, max_frames=3).num_frames == 6  # frames 0, 2, 4 (then 6 stops it)


def test_largest_first_filter_drops_covered_masks():
    big = np.zeros((40, 40), bool)
    big[:, :30] = True
    inside = np.zeros_like(big)
    inside[5:15, 5:15] = True  # fully covered by big: dropped
    half = np.zeros_like(big)
    half[0:10, 25:40] = True  # 1/3 covered: kept
    kept = proposals.keep_largest_first([inside, half, big, np.zeros_like(big)], 0.9)
    assert [int(m.sum()) for m in kept] == [big.sum(), half.sum()]


def test_remove_small_regions_fills_holes_and_drops_islands():
    m = disc(60, 60, 30, 30, 15)
    m[28:31, 28:31] = False  # a 9 px hole
    m[2:4, 2:4] = True  # a 4 px island
    out = proposals.remove_small_regions(m, 20)
    assert out[29, 29] and not out[2, 2] and out.sum() == disc(60, 60, 30, 30, 15).sum()
    border_gap = np.ones((10, 10), bool)
    border_gap[0, 0:3] = False  # background touching the border is no hole
    assert not proposals.remove_small_regions(border_gap, 20)[0, 1]


def test_new_objects_rule():
    cfg = load_config().tracking
    h = w = 100
    track = disc(h, w, 30, 30, 12)
    same = disc(h, w, 30, 31, 11)  # >= 90% inside the track: belongs to it
    new = disc(h, w, 70, 70, 8)  # in the untracked region: new
    straddle = disc(h, w, 30, 45, 10)  # partly inside the track, >= 10% untracked: new
    found = tracking.new_objects([track], [same, new, straddle], cfg, budget=10)
    assert [int(m.sum()) for m in found] == [int(new.sum()), int(straddle.sum())]
    assert len(tracking.new_objects([track], [same, new, straddle], cfg, budget=1)) == 1
    full = np.ones((h, w), bool)
    full[:2] = False  # 2% untracked: under min_untracked, no check
    assert tracking.new_objects([full], [new], cfg, budget=10) == []


def _tracks(masks_by_id, h=40, w=40):
    n = len(next(iter(masks_by_id.values())))
    return tracking.Tracks(positions=list(range(n)), height=h, width=w,
                           masks={i: [rle.encode(m) for m in ms] for i, ms in masks_by_id.items()},
                           seeds={i: 0 for i in masks_by_id})


def test_cleanup_drops_contained_duplicates_opens_and_drops_small():
    h = w = 40
    frames = 8
    a = [disc(h, w, 20, 10 + k, 8) for k in range(frames)]
    dup = [m.copy() for m in a]
    for k in (0, 1):
        dup[k] = np.zeros((h, w), bool)  # shorter life: the less stable one
    speck = [np.zeros((h, w), bool) for _ in range(frames)]
    for m in speck:
        m[1:3, 30:38] = True  # 2 px thick: removed by the 3x3 opening
    tiny = [disc(h, w, 35, 35, 2) for _ in range(frames)]  # 13 px: under 32 px
    tracks = _tracks({1: a, 2: dup, 3: speck, 4: tiny})
    cfg = load_config().cleanup
    assert cleanup.drop_contained_duplicates(tracks, cfg) == [2]
    out = cleanup.cleanup(tracks, cfg)
    assert out.ids == [1]
    assert rle.area(out.masks[1][0]) > 0.9 * a[0].sum()


def test_cleanup_keeps_parts_seen_too_briefly_together():
    h = w = 40
    a = [disc(h, w, 20, 20, 10) for _ in range(6)]
    part = [np.zeros((h, w), bool) for _ in range(6)]
    for k in range(4):  # inside `a` on 4 frames only (< 5 co-occurring): kept
        part[k] = disc(h, w, 20, 20, 4)
    assert cleanup.drop_contained_duplicates(_tracks({1: a, 2: part}), load_config().cleanup) == []


def test_relation_checks_drop_bad_items_and_convert_spans():
    h = w = 20
    m = rle.encode(disc(h, w, 10, 10, 4))
    video = Video(id="v", source="s", fps=2.0, num_frames=10, width=w, height=h, frame_indices=[0, 2, 4, 6, 8],
                  timestamps=[0.0, 1.0, 2.0, 3.0, 4.0])
    rec = Record(video, [Object(1, "cat", [], [m] * 5), Object(2, "dog", [], [m] * 5)])
    shown = shown_frames(5, 3)
    assert shown == [0, 2, 4]
    items = [
        {"subject": 1, "predicate": " Chasing ", "object": 2, "spans": [[0, 1]], "category": "motion"},
        {"subject": 1, "predicate": "chasing", "object": 2, "spans": [[2, 2]], "category": "motion"},  # merged
        {"subject": 2, "predicate": "looking at", "object": -1, "spans": [[1, 2]], "category": "attentional"},
        {"subject": 1, "predicate": "near", "object": 7, "spans": [[0, 1]], "category": "motion"},  # unknown id
        {"subject": 1, "predicate": "near", "object": 2, "spans": [[2, 1]], "category": "motion"},  # start > end
        {"subject": 1, "predicate": "near", "object": 2, "spans": [[0, 3]], "category": "motion"},  # past the end
        {"subject": 1, "predicate": "near", "object": 1, "spans": [[0, 1]], "category": "motion"},  # self
        {"subject": 1, "predicate": "near", "object": 2, "spans": [], "category": "motion"},  # no span
    ]
    result = _validated(items, rec, shown, temporal=True)
    assert result.dropped == 5
    got = {(r.subject, r.predicate, r.object, r.category): r.spans for r in result.relations}
    assert got == {(1, "chasing", 2, "motion"): [(0.0, 2.0), (4.0, 4.0)],
                   (2, "looking at", -1, "attentional"): [(2.0, 4.0)]}
    Record(video, rec.objects, result.relations).validate()


def test_parse_normalization_and_prices():
    p = _normalize({"name": "  Red   Ball ", "uncertain": False, "attributes": ["Red", "red", " shiny ", ""]})
    assert (p.name, p.attributes) == ("red ball", ["red", "shiny"])
    with pytest.raises(MalformedReply):
        _normalize({"name": " ", "uncertain": True, "attributes": []})
    prices = {"gpt-4.1": [2.0, 8.0], "gpt-4.1-mini": [0.4, 1.6]}
    assert price_of("gpt-4.1-mini-2025-04-14", prices) == (0.4, 1.6)
    assert price_of("gpt-4.1", prices) == (2.0, 8.0) and price_of("llama", prices) == (0.0, 0.0)
    assert request_key({"a": 1, "b": [2]}) == request_key({"b": [2], "a": 1})


def test_describer_choice_and_focal_crop():
    from data_gen.pipeline import describe
    from data_gen.pipeline.llm import LLMClient

    cfg = load_config()
    llm = LLMClient(cfg.llm)
    if not describe.dam_available():
        assert isinstance(describe.make_describer(cfg.describe, llm), describe.OpenAIDescriber)
        cfg.describe.describer = "dam"
        with pytest.raises(RuntimeError, match="`dam` package"):
            describe.make_describer(cfg.describe, llm)
    image = np.zeros((100, 160, 3), np.uint8)
    mask = np.zeros((100, 160), bool)
    mask[40:60, 100:120] = True
    crop = describe.focal_crop(image, mask)
    assert crop.shape == (48, 48, 3)  # 20 px box, +50% each side = 40, raised to the 48 px minimum
    drawn = describe.outline(image, mask)
    assert (drawn[40, 110] == describe.OUTLINE).all() and (drawn[50, 110] == 0).all()
    tracks = _tracks({1: [mask, mask & False, mask], 2: [disc(100, 160, 50, 50, 20)] * 3}, 100, 160)
    assert describe.largest_objects(tracks, 1) == [2] and describe.most_visible(tracks, 1, 8) == [0, 2]

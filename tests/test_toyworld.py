"""Toyworld: determinism, variety, and ground truth that matches what is drawn; the object catalog.

The checks recompute each property from the record's masks (decoded RLE) and the
scene's geometry with code of their own, not with the rules' implementation.
"""
import functools
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_gen import rle
from data_gen.record import CAMERA_ID, CATEGORIES, Record, sample_frame_indices, to_traser_json
from data_gen.shards import ShardReader
from data_gen.toyworld import (COLORS, PREDICATES, SHAPES, SIZES, TEXTURES, generate_video, generate_with_scene,
                               ToyworldConfig, render_all_frames, write_video_file)
from data_gen.toyworld.__main__ import main as toyworld_main
from data_gen.toyworld.draw import full_mask, silhouette
from data_gen.toyworld.shapes import OUTLINES, pattern_color

REPO = Path(__file__).resolve().parents[1]
VARIETY = [(0, i) for i in range(20)]
CHECKED = [(0, i) for i in range(8)] + [(7, i) for i in range(2)]  # ground truth verified pixel by pixel


@functools.lru_cache(maxsize=None)
def video(seed, index):
    return generate_with_scene(seed, index)


@functools.lru_cache(maxsize=None)
def decoded(seed, index):
    """{object id: bool [T, H, W]} of the record's masks."""
    _, record, _ = video(seed, index)
    return {o.id: np.stack([rle.decode(m).astype(bool) for m in o.masks]) for o in record.objects}


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def box(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def frames_of(record, span):
    ts = record.video.timestamps
    return ts.index(span[0]), ts.index(span[1])


def body_of(scene, object_id):
    return scene.bodies[object_id - 1]


# -- the record ------------------------------------------------------------------

@pytest.mark.parametrize("seed,index", CHECKED[:4])
def test_record_is_valid_and_shaped_like_the_video(seed, index):
    scene, record, frames = video(seed, index)
    v = record.validate().video
    assert v.id == f"toy-{seed}-{index:06d}"
    assert v.num_frames == scene.duration * scene.fps and v.duration == scene.duration
    assert v.frame_indices == sample_frame_indices(v.num_frames, v.fps)
    assert v.timestamps == [round(f / v.fps, 6) for f in v.frame_indices]
    assert frames.dtype == np.uint8 and frames.shape == (len(v.frame_indices), v.height, v.width, 3)
    assert 4 <= v.duration <= 40 and 1 <= v.fps <= 6 and max(v.width, v.height) <= 448
    for o in record.objects:
        body = body_of(scene, o.id)
        assert o.name == body.shape and o.attributes == [body.color, body.size, body.texture]
    for r in record.relations:
        assert r.category == PREDICATES[r.predicate]
        assert (r.object == CAMERA_ID) == (r.predicate in ("enters", "exits"))
    again = Record.from_json(record.to_json())
    assert again.to_json() == record.to_json()
    assert len(to_traser_json(record)["objects"]) == len(record.objects)


def test_same_seed_and_index_give_identical_output():
    r1, f1 = generate_video(5, 17)
    r2, f2 = generate_video(5, 17)
    assert r1.to_json() == r2.to_json()
    assert np.array_equal(f1, f2)
    r3, _ = generate_video(5, 18)
    assert r3.to_json() != r1.to_json()


def test_variety_over_twenty_videos():
    names, colors, sizes, textures, categories, predicates = Counter(), Counter(), Counter(), Counter(), Counter(), \
        Counter()
    durations, fps, dims = set(), set(), set()
    for seed, index in VARIETY:
        _, record, _ = video(seed, index)
        v = record.video
        durations.add(v.duration)
        fps.add(v.fps)
        dims.add((v.width, v.height))
        for o in record.objects:
            names[o.name] += 1
            colors[o.attributes[0]] += 1
            sizes[o.attributes[1]] += 1
            textures[o.attributes[2]] += 1
        categories.update(r.category for r in record.relations)
        predicates.update(r.predicate for r in record.relations)
    assert len(names) >= 4 and set(names) <= set(SHAPES)
    assert set(colors) == set(COLORS) and len(COLORS) == 8
    assert set(sizes) == set(SIZES) == {"small", "medium", "large"}
    assert len(textures) >= 2 and set(textures) <= set(TEXTURES)
    assert {"spatial", "motion", "event_level", "stateful"} <= set(categories) <= set(CATEGORIES)
    for predicate in ("in front of", "behind", "on top of", "above", "moving toward", "moving away from",
                      "following", "passing", "collides with", "enters", "exits", "riding on"):
        assert predicates[predicate] > 0, predicate
    assert len(durations) >= 8 and min(durations) < 15 and max(durations) > 30
    assert len(fps) >= 4
    assert len(dims) >= 10 and any(w != h for w, h in dims)


def test_knobs_are_checked_and_used():
    with pytest.raises(TypeError, match="max_objectz"):
        generate_video(0, 0, max_objectz=3)
    with pytest.raises(ValueError, match="fps_choices"):
        generate_video(0, 0, fps_choices=(7,))
    with pytest.raises(ValueError, match="min_objects=5, max_objects=2"):
        generate_video(0, 0, min_objects=5, max_objects=2)
    record, frames = generate_video(0, 0, min_duration=4, max_duration=4, fps_choices=(2,), min_side=224,
                                    max_side=224, max_objects=3)
    assert record.video.duration == 4 and record.video.fps == 2 and frames.shape[1:3] == (224, 224)
    assert len(record.objects) <= 3
    # the command-line form (data_gen.toyworld and pretrain_vision --knob KEY=VALUE)
    assert ToyworldConfig.parse_knobs(["max_objects=4", "fps_choices=[1, 2]"]) == {"max_objects": 4,
                                                                                    "fps_choices": [1, 2]}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        ToyworldConfig.parse_knobs(["max_objects"])
    with pytest.raises(ValueError, match="fps_choices"):
        ToyworldConfig.parse_knobs(["fps_choices=[7]"])
    with pytest.raises(TypeError, match="max_objectz"):
        ToyworldConfig.parse_knobs(["max_objectz=3"])


# -- masks are what is drawn ---------------------------------------------------------

@pytest.mark.parametrize("seed,index", CHECKED)
def test_masks_are_the_drawn_visible_regions(seed, index):
    """Each mask = the object's shape drawn alone minus every nearer object's shape; each masked pixel shows
    one of the object's two texture colors; pixels under no mask show the background."""
    scene, record, frames = video(seed, index)
    masks = decoded(seed, index)
    in_record = {o.id for o in record.objects}
    for j, f in enumerate(record.video.frame_indices):
        alone = {b.index + 1: full_mask(scene, b, f) for b in scene.bodies}
        covered = np.zeros(frames.shape[1:3], bool)
        for body in scene.bodies:
            oid = body.index + 1
            nearer = np.zeros_like(covered)
            for other in scene.bodies:
                if other.depth < body.depth:
                    nearer |= alone[other.index + 1]
            expected = alone[oid] & ~nearer
            if oid not in in_record:
                assert not expected.any()  # dropped only when never visible on a sampled frame
                continue
            assert np.array_equal(masks[oid][j], expected), (oid, j)
            pixels = frames[j][masks[oid][j]].reshape(-1, 3)
            palette = np.array([COLORS[body.color], pattern_color(body.color)], np.int64)
            matches = (pixels[:, None, :] == palette[None]).all(-1)
            assert matches.any(axis=1).all(), (oid, j)
            if body.texture == "solid":
                assert matches[:, 0].all()
            covered |= masks[oid][j]
        assert np.array_equal(frames[j][~covered], scene.background[~covered])


@pytest.mark.parametrize("seed,index", CHECKED[:6])
def test_sizes_and_textures_are_visible_in_the_pixels(seed, index):
    scene, record, frames = video(seed, index)
    masks = decoded(seed, index)
    side = min(record.video.width, record.video.height)
    for o in record.objects:
        body = body_of(scene, o.id)
        outline = OUTLINES[body.shape]
        unit_area = math.pi if outline is None else 0.5 * abs(
            np.dot(outline[:, 0], np.roll(outline[:, 1], -1)) - np.dot(outline[:, 1], np.roll(outline[:, 0], -1)))
        expected = unit_area * (SIZES[o.attributes[1]] * side) ** 2
        for j, f in enumerate(record.video.frame_indices):
            whole = full_mask(scene, body, f)
            m = masks[o.id][j]
            x, y = scene.pos[body.index, scene.step_of_frame(f)]
            inside = body.radius < x < record.video.width - body.radius and body.radius < y < \
                record.video.height - body.radius
            if m.any() and inside and np.array_equal(m, whole):  # unoccluded, uncut
                assert abs(m.sum() / expected - 1) < 0.15, (o.id, j, m.sum(), expected)
                n_pattern = (frames[j][m] == np.array(pattern_color(body.color))).all(-1).sum()
                if body.texture != "solid" and m.sum() > 300:
                    assert 0.1 * m.sum() < n_pattern < 0.9 * m.sum(), (o.id, body.texture)


# -- relations match the masks and the trajectories ---------------------------------------

def interval_checks(record, masks, rel, span):
    """The per-interval motion facts of `rel` on `span`, from mask centroids."""
    j0, j1 = frames_of(record, span)
    a, b = masks[rel.subject], masks[rel.object]
    ca = [centroid(a[j]) for j in range(j0, j1 + 1)]
    cb = [centroid(b[j]) for j in range(j0, j1 + 1)]
    d = [np.linalg.norm(p - q) for p, q in zip(ca, cb)]
    if rel.predicate == "moving toward":
        assert j1 - j0 >= 2 and all(d[k + 1] < d[k] for k in range(len(d) - 1)), d
    elif rel.predicate == "moving away from":
        assert j1 - j0 >= 2 and all(d[k + 1] > d[k] for k in range(len(d) - 1)), d
    elif rel.predicate == "following":
        for k in range(len(d) - 1):
            da, db = ca[k + 1] - ca[k], cb[k + 1] - cb[k]
            assert da @ db > 0 and (cb[k + 1] - ca[k + 1]) @ db > 0
    elif rel.predicate == "passing":  # a pass on every interval of the span
        for k in range(len(d) - 1):
            u = ca[k + 1] - ca[k]
            assert (ca[k] - cb[k]) @ u < 0 < (ca[k + 1] - cb[k + 1]) @ u
    elif rel.predicate == "riding on":
        for k in range(len(d) - 1):
            assert np.linalg.norm(cb[k + 1] - cb[k]) > 0  # the carrier moves
    else:
        raise AssertionError(rel.predicate)


@pytest.mark.parametrize("seed,index", CHECKED)
def test_motion_spans_match_mask_centroids(seed, index):
    scene, record, _ = video(seed, index)
    masks = decoded(seed, index)
    for rel in record.relations:
        if rel.category in ("motion", "stateful"):
            for span in rel.spans:
                assert span[1] > span[0]
                interval_checks(record, masks, rel, span)


@pytest.mark.parametrize("seed,index", CHECKED)
def test_spatial_spans_match_masks_and_depth(seed, index):
    scene, record, _ = video(seed, index)
    masks = decoded(seed, index)
    rels = {(r.subject, r.predicate, r.object): r.spans for r in record.relations}
    inverse = {"in front of": "behind", "behind": "in front of", "above": "below", "below": "above"}
    for (s, p, o), spans in rels.items():
        if p in inverse:
            assert rels.get((o, inverse[p], s)) == spans
        for span in spans:
            j0, j1 = frames_of(record, span)
            for j in range(j0, j1 + 1):
                f = record.video.frame_indices[j]
                a, b = masks[s][j], masks[o][j] if o != CAMERA_ID else None
                if p == "in front of":
                    assert body_of(scene, s).depth < body_of(scene, o).depth
                    assert (a & full_mask(scene, body_of(scene, o), f)).sum() >= 10
                elif p == "above":
                    ax0, ay0, ax1, ay1 = box(a)
                    bx0, by0, bx1, by1 = box(b)
                    assert ay1 + 2 <= by0 and min(ax1, bx1) > max(ax0, bx0)
                elif p == "on top of":
                    sa, sb = full_mask(scene, body_of(scene, s), f), full_mask(scene, body_of(scene, o), f)
                    whole = np.array_equal(a, sa) and np.array_equal(b, sb) and not (
                        a[0].any() or a[-1].any() or a[:, 0].any() or a[:, -1].any() or
                        b[0].any() or b[-1].any() or b[:, 0].any() or b[:, -1].any())
                    if whole:  # neither hidden nor cut by the frame: check that they touch
                        ax0, _, ax1, ay1 = box(a)
                        bx0, by0, bx1, _ = box(b)
                        assert abs(ay1 - by0) <= 2 and bx0 <= (ax0 + ax1) / 2 <= bx1
    # Completeness: every visible occlusion of 10+ px is reported as "in front of" at that frame.
    for j, f in enumerate(record.video.frame_indices):
        for a in record.objects:
            for b in record.objects:
                ba, bb = body_of(scene, a.id), body_of(scene, b.id)
                if a.id == b.id or ba.depth > bb.depth or not (masks[a.id][j].any() and masks[b.id][j].any()):
                    continue
                if (masks[a.id][j] & full_mask(scene, bb, f)).sum() >= 10:
                    t = record.video.timestamps[j]
                    assert any(s <= t <= e for s, e in rels.get((a.id, "in front of", b.id), [])), (a.id, b.id, t)


@pytest.mark.parametrize("seed,index", CHECKED)
def test_enters_and_exits_match_first_and_last_visible_frames(seed, index):
    scene, record, _ = video(seed, index)
    masks = decoded(seed, index)
    ts = record.video.timestamps
    rels = {(r.subject, r.predicate): r.spans for r in record.relations if r.object == CAMERA_ID}
    for o in record.objects:
        body = body_of(scene, o.id)
        visible = masks[o.id].any(axis=(1, 2))
        in_image = np.array([full_mask(scene, body, f).any() for f in record.video.frame_indices])
        enters, exits = rels.get((o.id, "enters"), []), rels.get((o.id, "exits"), [])
        for s, e in enters:
            j = ts.index(s)
            assert s == e and visible[j] and j > 0 and not visible[j - 1]
        for s, e in exits:
            j = ts.index(s)
            assert s == e and visible[j] and j < len(ts) - 1 and not visible[j + 1]
        first, last = np.flatnonzero(visible)[[0, -1]]
        if first > 0 and not in_image[:first].any():  # came in from outside the frame
            assert (ts[first], ts[first]) in enters
        if first == 0:
            assert all(ts.index(s) > 0 for s, _ in enters)
        if last < len(ts) - 1 and not in_image[last + 1:].any():  # left for good
            assert (ts[last], ts[last]) in exits


def boundary_points(mask):
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    ys, xs = np.nonzero(mask & ~inner)
    return np.stack([xs, ys], axis=1).astype(np.float64)


@pytest.mark.parametrize("seed,index", CHECKED)
def test_collisions_happen_where_shapes_touch_and_turn_back(seed, index):
    scene, record, _ = video(seed, index)
    ts = record.video.timestamps
    for rel in (r for r in record.relations if r.predicate == "collides with"):
        a, b = rel.subject - 1, rel.object - 1
        contacts = [c for c in scene.contacts if (c.striker, c.other) == (a, b)]  # the faster one is the subject
        for s, e in rel.spans:
            j = ts.index(s)
            assert ts.index(e) in (j, j + 1)
            first, last = (scene.step_of_frame(record.video.frame_indices[ts.index(t)]) for t in (s, e))
            hits = [c for c in contacts if first <= c.step <= last]
            assert hits, (rel, s, e)
            c = hits[0]
            # The two shapes (drawn alone at the moment of contact) nearly touch...
            points = []
            for i in (a, b):
                y0, x0, inside = silhouette(scene, scene.bodies[i], c.step)
                p = boundary_points(np.pad(inside, 1)) + [x0 - 1, y0 - 1]
                points.append(p)
            gap = np.sqrt(((points[0][:, None] - points[1][None]) ** 2).sum(-1)).min()
            reach = scene.bodies[a].radius + scene.bodies[b].radius
            assert gap <= 0.3 * reach, (gap, reach)
            # ...and, when nothing else interferes (another contact of either, a hop off a carrier, a
            # border), they were closing in before it and separate after it.
            k = c.step
            near = [o for o in scene.contacts if o != c and abs(o.step - k) <= 6 and {o.striker, o.other} & {a, b}]
            hop = any(abs(scene.bodies[i].dismount_step - k) <= 6 for i in (a, b))
            margin = [scene.bodies[i].radius * 1.5 for i in (a, b)]
            clear = all(m < scene.pos[i, k, 0] < scene.width - m and m < scene.pos[i, k, 1] < scene.height - m
                        for i, m in zip((a, b), margin))
            if near or hop or not clear or k + 3 >= scene.pos.shape[1] or k < 2:
                continue
            dist = lambda step: np.linalg.norm(scene.pos[a, step] - scene.pos[b, step])  # noqa: E731
            assert dist(k - 2) > dist(k - 1) and dist(k + 3) > dist(k + 1), [dist(i) for i in range(k - 2, k + 4)]


# -- native-fps video and the CLI -------------------------------------------------

def test_write_video_file_round_trips_through_pyav(tmp_path):
    import av
    knobs = dict(min_duration=4, max_duration=5, fps_choices=(3,), min_side=224, max_side=280, max_objects=4)
    record = write_video_file(2, 9, tmp_path / "toy.mp4", **knobs)
    _, all_frames = render_all_frames(2, 9, **knobs)
    sampled, sampled_frames = generate_video(2, 9, **knobs)
    assert record.video.source == str(tmp_path / "toy.mp4")
    assert all_frames.shape[0] == record.video.num_frames
    assert np.array_equal(all_frames[record.video.frame_indices], sampled_frames)
    d1, d2 = record.to_dict(), sampled.to_dict()
    d1["video"].pop("source"), d2["video"].pop("source")
    assert d1 == d2
    with av.open(str(tmp_path / "toy.mp4")) as container:
        stream = container.streams.video[0]
        decoded_frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        assert float(stream.average_rate) == record.video.fps
    assert decoded_frames.shape == all_frames.shape
    assert np.abs(decoded_frames.astype(int) - all_frames.astype(int)).mean() < 4.0


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "data_gen.toyworld", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if not p.name.startswith(".")}


def test_cli_writes_identical_shards_twice(tmp_path, capsys):
    args = ["--num-videos", "3", "--seed", "4", "--records-per-shard", "2"]
    out = run_cli(*args, "--out", str(tmp_path / "a"))  # the command line...
    assert toyworld_main([*args, "--out", str(tmp_path / "b")]) == 0  # ...and a second run, in-process
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert a == b and len(a) == 3  # two shards and the manifest
    assert json.loads(out.stdout)["videos"] == 3 and json.loads(capsys.readouterr().out)["videos"] == 3
    reader = ShardReader(tmp_path / "a")
    assert reader.format == "arrayrecord" and reader.ids() == [f"toy-4-{i:06d}" for i in range(3)]
    for i, example in enumerate(reader):
        record, frames = generate_video(4, i)
        assert example.record.to_json() == record.to_json()
        assert np.abs(example.frames.astype(int) - frames.astype(int)).mean() < 3.0  # JPEG


def test_cli_tfrecord_png_stores_the_exact_frames_and_resumes(tmp_path, capsys):
    args = ["--seed", "6", "--format", "tfrecord", "--image-format", "png", "--out", str(tmp_path)]
    assert toyworld_main(["--num-videos", "1", *args]) == 0
    assert toyworld_main(["--num-videos", "2", *args]) == 0  # adds video 1, keeps video 0
    reader = ShardReader(tmp_path)
    assert reader.format == "tfrecord" and reader.ids() == ["toy-6-000000", "toy-6-000001"]
    for i, example in enumerate(reader):
        record, frames = generate_video(6, i)
        assert example.record.to_json() == record.to_json()
        assert np.array_equal(example.frames, frames)
    capsys.readouterr()
    assert toyworld_main(["--num-videos", "2", "--seed", "6", "--image-format", "png", "--out", str(tmp_path)]) == 2
    assert "format='tfrecord'" in capsys.readouterr().err  # a directory is never mixed


# -- the object catalog -------------------------------------------------------------------

def test_catalog_crops_show_their_object_where_its_mask_says():
    """Catalog crops: deterministic in (seed, index); the crop spans `crop` pixels of a frame resized to
    frame_size, at the native scale of the knobs' frame sides; every pixel of the object's mask carries
    one of its two texture colors, its size is the drawn size, and its centroid sits within `jitter`
    crops of the middle (up to occlusion by the other objects and the window's edge)."""
    from data_gen.toyworld.catalog import catalog_crop

    config = ToyworldConfig.from_knobs(max_side=280)
    sides = {224, 252, 280}
    first = catalog_crop(3, 0, 56, (168, 168), config=config)
    again = catalog_crop(3, 0, 56, (168, 168), config=config)
    np.testing.assert_array_equal(first.frames, again.frames)
    assert (first.name, first.attributes) == (again.name, again.attributes)
    seen, moved = set(), 0
    for index in range(40):
        item = catalog_crop(3, index, 56, (168, 168), jitter=0.125, config=config)
        _, h, w, _ = item.frames.shape
        height, width = (min(sides, key=lambda s: abs(s - n * 168 / 56)) for n in (h, w))  # h = round(56 H / 168)
        assert abs(height * 56 / 168 - h) <= 0.5 and abs(width * 56 / 168 - w) <= 0.5, (h, w)
        assert item.name in SHAPES
        color, size, texture = item.attributes
        assert color in COLORS and size in SIZES and texture in TEXTURES
        seen.add(item.name)
        moved += not np.array_equal(item.frames[0], item.frames[1])
        if not item.mask.any():
            continue
        pixels = item.frames[0][item.mask]
        own = (pixels == np.array(COLORS[color])).all(-1) | (pixels == np.array(pattern_color(color))).all(-1)
        assert own.all(), index
        cy, cx = np.argwhere(item.mask).mean(0) + 0.5
        outline = OUTLINES[item.name]
        unit_area = math.pi if outline is None else 0.5 * abs(
            np.dot(outline[:, 0], np.roll(outline[:, 1], -1)) - np.dot(outline[:, 1], np.roll(outline[:, 0], -1)))
        side = min(height, width)
        whole = unit_area * (SIZES[size] * side) ** 2
        assert item.mask.sum() <= 1.15 * whole, index
        if item.mask.sum() > 0.9 * whole:  # about all of it shows: its centroid is the object's center
            assert abs(cy - h / 2) <= 0.125 * h + 1 and abs(cx - w / 2) <= 0.125 * w + 1, index
    assert len(seen) >= 5 and moved >= 20


def test_catalog_refuses_a_jitter_past_half_a_crop_and_a_crop_past_the_frame():
    from data_gen.toyworld.catalog import catalog_crop

    with pytest.raises(ValueError, match="jitter 0.6"):
        catalog_crop(0, 0, 56, (168, 168), jitter=0.6)
    with pytest.raises(ValueError, match="crop 200"):
        catalog_crop(0, 0, 200, (168, 168))

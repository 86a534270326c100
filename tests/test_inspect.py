"""`python -m data_gen.inspect` summaries and the scene-graph pictures of data_gen.render."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_gen.inspect import main as inspect_main
from data_gen.record import from_traser_json, to_traser_json
from data_gen.render import render_comparison, render_scene_graph
from data_gen.shards import ShardWriter
from data_gen.toyworld import generate_video

REPO = Path(__file__).resolve().parents[1]
SEED, NUM_VIDEOS = 3, 5


def run_inspect(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "data_gen.inspect", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    videos = [generate_video(SEED, i) for i in range(NUM_VIDEOS)]
    with ShardWriter(out, format="tfrecord", records_per_shard=2) as writer:
        for record, frames in videos:
            writer.write(record, frames)
    return out, [record for record, _ in videos]


def test_summary_counts_what_the_shards_hold(shard_dir):
    out, records = shard_dir
    result = run_inspect(out)
    summary = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert summary["videos"] == NUM_VIDEOS
    assert summary["objects"] == sum(len(r.objects) for r in records)
    assert summary["attributes"] == sum(len(o.attributes) for r in records for o in r.objects)
    assert summary["relations"] == sum(len(r.relations) for r in records)
    assert summary["frames"] == sum(len(r.video.frame_indices) for r in records)
    assert summary["shards"] == 3 and summary["format"] == "tfrecord" and summary["checksums_ok"] is True
    assert sum(summary["predicates"].values()) == summary["relations"]
    assert sum(summary["categories"].values()) == summary["relations"]
    assert sum(summary["object_names"].values()) == summary["objects"]
    assert sum(summary["attribute_values"].values()) == summary["attributes"]
    durations = [r.video.duration for r in records]
    assert summary["mean_duration_s"] == pytest.approx(np.mean(durations), abs=1e-3)
    assert summary["min_duration_s"] == min(durations) and summary["max_duration_s"] == max(durations)
    assert sum(summary["fps"].values()) == NUM_VIDEOS


def test_inspect_reports_a_missing_directory_and_an_unknown_video(shard_dir, tmp_path, capsys):
    out, _ = shard_dir
    assert inspect_main([str(tmp_path / "nothing")]) == 2
    captured = capsys.readouterr()
    assert "manifest.json" in captured.err and captured.out == ""
    assert inspect_main([str(out), "--render", "toy-9-999999", "--out", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert "toy-9-999999" in captured.err and captured.out == "" and not (tmp_path / "x.png").exists()


def test_render_draws_the_video_scene_graph(shard_dir, tmp_path):
    out, records = shard_dir
    video_id = records[3].video.id
    result = json.loads(run_inspect(out, "--render", video_id, "--out", tmp_path / "graph.png").stdout)
    assert result == {"video_id": video_id, "rendered": str(tmp_path / "graph.png"),
                      "objects": len(records[3].objects), "relations": len(records[3].relations)}
    with Image.open(tmp_path / "graph.png") as image:
        assert image.format == "PNG" and image.width == 1600
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # a picture, not a blank page


def test_timeline_grows_with_the_relations(tmp_path):
    record, frames = generate_video(0, 10)
    full = render_scene_graph(record, frames, tmp_path / "full.png", title="all relations")
    few = dataclasses.replace(record, relations=record.relations[:2])
    short = render_scene_graph(few, frames, tmp_path / "few.png")
    with Image.open(full) as a, Image.open(short) as b:
        assert a.height > b.height + 0.15 * 100 * (len(record.relations) - 2)


def test_render_accepts_shrunk_frames_and_rejects_wrong_ones(tmp_path):
    record, frames = generate_video(0, 11)
    half = frames[:, ::2, ::2]
    render_scene_graph(record, half, tmp_path / "half.png")
    assert (tmp_path / "half.png").stat().st_size > 0
    with pytest.raises(ValueError, match="frames have shape"):
        render_scene_graph(record, frames[:-1], tmp_path / "bad.png")


def test_render_comparison_of_a_prediction(tmp_path):
    gt, frames = generate_video(0, 8)
    payload = to_traser_json(gt)
    payload["objects"][0][next(iter(payload["objects"][0]))] = "blob"  # a wrong name
    payload["relationships"] = payload["relationships"][1:] + [[1, "floating over", 2, [[0, 1]]]]
    pred = from_traser_json(payload, gt)
    path = render_comparison(gt, pred, frames, tmp_path / "compare.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == 1600 and np.asarray(image.convert("L")).std() > 10
        height = image.height
    # A looping model's repeats of one triplet share its row (the figure grows a row per triplet).
    payload["relationships"] += [[1, "floating over", 2, [[k, k + 1]]] for k in range(2, 6)]
    looped = render_comparison(gt, from_traser_json(payload, gt), frames, tmp_path / "looped.png")
    with Image.open(looped) as image:
        assert image.height == height

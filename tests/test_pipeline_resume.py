"""A generation run killed with SIGKILL, then restarted, writes every video exactly once."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data_gen.shards import ShardReader, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["sam2.config=configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.image_size=128", "proposals.point_grids=[4]",
            "proposals.crop_n_layers=0", "proposals.frame_stride=4", "proposals.pred_iou_thresh=0",
            "proposals.stability_score_thresh=0", "tracking.max_objects=3", "output.records_per_shard=1"]


def command(videos: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "data_gen.generate", "--videos", str(videos / "*.mp4"), "--out", str(out),
           "--stages", "1-3", "--no-progress"]
    for s in SETTINGS:
        cmd += ["--set", s]
    return cmd


def listed(out: Path) -> list[str]:
    try:
        return [v for shard in read_manifest(out)["shards"] for v in shard["video_ids"]]
    except Exception:  # no manifest yet
        return []


def test_sigkill_then_restart_writes_every_video_once(tmp_path):
    from data_gen.toyworld import write_video_file

    videos, out = tmp_path / "videos", tmp_path / "out"
    for i in range(4):
        write_video_file(4, i, videos / f"v{i}.mp4", min_duration=4, max_duration=4, fps_choices=[2], max_side=224)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command(videos, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not listed(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = listed(out)
    assert 1 <= len(before) < 4
    done = subprocess.run(command(videos, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = listed(out)
    assert sorted(after) == ["v0", "v1", "v2", "v3"]  # each exactly once
    assert after[: len(before)] == before
    examples = list(ShardReader(out))
    assert sorted(e.video_id for e in examples) == ["v0", "v1", "v2", "v3"]
    report = json.loads((out / "run_report.json").read_text())
    assert report["already_written"] == len(before) and report["written"] == 4 - len(before)
    assert not list(out.glob("*.incomplete"))

"""The Ray engine on a local Ray instance writes the same records as the in-process engine."""
import os

import pytest
import torch

from data_gen.pipeline.config import load_config
from data_gen.pipeline.loopback import LoopbackServer
from data_gen.pipeline.run import run_job
from data_gen.shards import ShardReader

SMALL = ["sam2.config=configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.image_size=128", "proposals.point_grids=[4]",
         "proposals.crop_n_layers=0", "proposals.frame_stride=4", "proposals.pred_iou_thresh=0",
         "proposals.stability_score_thresh=0", "tracking.max_objects=3", "engine.threads_per_actor=1"]
KEY = "sk-ray-loopback-0b9e"


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ["OPENAI_API_KEY"] = KEY  # before the workers start: they inherit the environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    os.environ.pop("OPENAI_API_KEY", None)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from data_gen.toyworld import write_video_file

    folder = tmp_path_factory.mktemp("videos")
    for i in range(2):
        write_video_file(6, i, folder / f"r{i}.mp4", min_duration=4, max_duration=4, fps_choices=[2], max_side=224)
    (folder / "r9.mp4").write_bytes(b"not a video")
    return sorted(str(p) for p in folder.glob("*.mp4"))


def records(out):
    return {e.video_id: e.record.to_json() for e in ShardReader(out)}


def both_engines(videos, tmp_path, last_stage, overrides):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray actor runs one torch thread too (engine.threads_per_actor)
    try:
        local = run_job(videos, tmp_path / "local", load_config(overrides=overrides), last_stage, progress=False)
    finally:
        torch.set_num_threads(before)
    remote = run_job(videos, tmp_path / "ray", load_config(overrides=overrides + ["engine.kind=ray"]), last_stage,
                     progress=False)
    return local, remote


def test_ray_engine_writes_the_same_records_stages_1_to_3(ray_local, videos, tmp_path):
    local, remote = both_engines(videos, tmp_path, 3, SMALL)
    assert (remote["engine"], remote["written"], remote["failed"]) == ("ray", 2, 1)
    assert remote["errors"][0]["video_id"] == "r9" and remote["errors"][0]["stage"] == "decode"
    got, want = records(tmp_path / "ray"), records(tmp_path / "local")
    assert sorted(got) == ["r0", "r1"] and got == want


@pytest.mark.slow
def test_ray_engine_writes_the_same_records_stages_1_to_6(ray_local, videos, tmp_path):
    with LoopbackServer() as server:
        overrides = SMALL + [f"llm.base_url={server.url}", "describe.describer=openai", "llm.concurrency=4",
                             "describe.image_max_side=96", "relations.image_max_side=96"]
        local, remote = both_engines(videos, tmp_path, 6, overrides)
        sent = server.count
    assert (remote["written"], remote["failed"]) == (2, 1)
    got, want = records(tmp_path / "ray"), records(tmp_path / "local")
    assert got == want and all('"name":"object"' in r for r in got.values())
    # both runs made the same calls (each its own cache); the report counts the actor's usage
    assert remote["usage"]["describe"]["requests"] == local["usage"]["describe"]["requests"] > 0
    assert sent == 2 * sum(u["requests"] for u in local["usage"].values())

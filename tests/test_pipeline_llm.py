"""Stages 4-6 with the real `openai` client against a loopback OpenAI-compatible server.

The server (data_gen/pipeline/loopback.py, stdlib http.server) answers like an
endpoint and can be told to return malformed, truncated or off-schema JSON, 429
and 500. Visual stages come from toyworld ground truth or an oracle: no SAM2 here.
"""
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from data_gen.pipeline import tracker_eval as te
from data_gen.pipeline.config import load_config
from data_gen.pipeline.engines import InProcessEngine
from data_gen.pipeline.job import LanguageStages, VisualStages, language_step, visual_from_record
from data_gen.pipeline.loopback import LoopbackServer
from data_gen.pipeline.run import run_job
from data_gen.shards import ShardReader
from data_gen.toyworld import generate_video, simulate, write_video_file
from data_gen.toyworld.draw import render_frame

KEY = "sk-loopback-7f3a9c-DO-NOT-LEAK-41d2"
KNOBS = dict(min_duration=4, max_duration=6, fps_choices=[2], max_side=224, max_objects=4)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with LoopbackServer() as s:
        yield s


def config(server, *extra):
    return load_config(overrides=[f"llm.base_url={server.url}", "llm.backoff_s=0.001", "llm.backoff_max_s=0.01",
                                  "describe.describer=openai", "describe.frames_per_object=3",
                                  "describe.image_max_side=96", "relations.image_max_side=96", *extra])


@pytest.fixture(scope="module")
def toy():
    record, frames = generate_video(11, 0, **KNOBS)
    return visual_from_record(record, frames), record


def test_stages_4_to_6_name_objects_and_relate_them(server, toy, tmp_path):
    visual, truth = toy
    language = LanguageStages(config(server), tmp_path / "cache")
    result = language_step(language, visual, 6)
    assert result.error is None, result.error
    rec = result.record.validate()
    k = len(truth.objects)
    assert len(rec.objects) == k >= 2
    assert all(o.name == "object" and o.attributes == ["small", "round", "smooth"] for o in rec.objects)
    assert all(o.description.startswith("A small round object") for o in rec.objects)
    by_kind = {(r.predicate, r.category) for r in rec.relations}
    assert by_kind == {("in front of", "spatial"), ("moving toward", "motion"), ("looking at", "attentional")}
    camera = next(r for r in rec.relations if r.object == -1)
    last = rec.video.timestamps[-1]
    assert camera.spans == [(0.0, 0.0), (last, last)]  # shown-frame ids became seconds
    # a description per object, a parse per distinct description (objects seen in as many frames get the
    # same one from the loopback server), two relation calls
    parses = len({o.description for o in rec.objects})
    assert server.count == k + parses + 2
    assert set(server.auth_headers) == {f"Bearer {KEY}"}
    usage = language.meter.to_dict()
    assert {s: u["requests"] for s, u in usage.items()} == {"describe": k, "parse": parses, "relations": 2}
    assert all(u["prompt_tokens"] > 0 and u["completion_tokens"] > 0 and u["cost_usd"] > 0 for u in usage.values())
    # the 1-fps frames of every relation call carry each object's id, label and box
    user = server.requests[-1]["messages"][-1]["content"]
    contexts = [json.loads(p["text"]) for p in user if p["type"] == "text" and p["text"].startswith("{")]
    assert len(contexts) == len(rec.video.frame_indices)
    assert set(contexts[0]) == {"frame_id", "time_s", "width", "height", "objects"}
    assert {o["label"] for c in contexts for o in c["objects"]} == {"object"}


def test_second_run_sends_zero_requests(server, toy, tmp_path):
    visual, _ = toy
    first = language_step(LanguageStages(config(server), tmp_path / "cache"), visual, 6)
    sent = server.count
    again = LanguageStages(config(server), tmp_path / "cache")
    second = language_step(again, visual, 6)
    assert server.count == sent and second.record.to_json() == first.record.to_json()
    # the response cache alone (per-video stage files gone) still pays for nothing
    for f in (tmp_path / "cache" / "videos").rglob("*.json"):
        f.unlink()
    third = LanguageStages(config(server), tmp_path / "cache")
    assert language_step(third, visual, 6).record.to_json() == first.record.to_json()
    assert server.count == sent
    assert {u["cached"] for u in third.meter.to_dict().values()} and all(
        u["requests"] == 0 for u in third.meter.to_dict().values())


def test_429_and_500_are_retried_with_backoff(server, toy, tmp_path):
    visual, _ = toy
    server.fail("429", "500", "429")
    language = LanguageStages(config(server, "llm.concurrency=1"), tmp_path / "cache")
    result = language_step(language, visual, 6)
    assert result.error is None
    assert language.meter.to_dict()["describe"]["retries"] == 3


def test_a_malformed_reply_is_asked_again(server, toy, tmp_path):
    visual, _ = toy
    server.fail("malformed", "truncated")
    language = LanguageStages(config(server, "llm.concurrency=1"), tmp_path / "cache")
    result = language_step(language, visual, 6)
    assert result.error is None and language.meter.to_dict()["describe"]["retries"] == 2


@pytest.mark.parametrize("fault,reason", [("malformed", "is not JSON"), ("truncated", "cut at the token limit"),
                                          ("schema", "breaks the schema"), ("empty", "reply is empty"),
                                          ("500", "failed 3 times")])
def test_persistent_failure_is_that_videos_error(server, toy, tmp_path, fault, reason):
    visual, _ = toy
    server.fail(*[fault] * 3)  # format_retries=2 and max_retries=2: three attempts each
    cfg = config(server, "llm.concurrency=1", "llm.max_retries=2")
    result = language_step(LanguageStages(cfg, tmp_path / "cache"), visual, 6)
    assert result.record is None
    assert result.error["stage"] == "describe" and reason in result.error["reason"]
    assert result.error["video_id"] == visual.video_id


class OracleVisual:
    """Stages 0-3 on real video files with an oracle in place of SAM2 (it knows each video's labels)."""

    def __init__(self, cfg, cache_root, scenes):
        self.cfg, self.cache_root, self.scenes = cfg, cache_root, scenes

    def run(self, path, video_id, on_stage=None):
        frames, labels = self.scenes[video_id]
        stages = VisualStages(self.cfg, self.cache_root, te.OracleSegmenter(frames, labels),
                              te.OraclePropagator(labels))
        return stages.run(path, video_id, on_stage)


def toy_files(folder: Path, count: int):
    scenes = {}
    for i in range(count):
        write_video_file(12, i, folder / f"toy{i}.mp4", **KNOBS)
        scene = simulate(12, i, **KNOBS)
        drawn = [render_frame(scene, f) for f in range(scene.num_frames)]
        scenes[f"toy{i}"] = (np.stack([f for f, _ in drawn]), np.stack([lab for _, lab in drawn]))
    return sorted(str(p) for p in folder.glob("*.mp4")), scenes


def run_with_oracle(videos, scenes, out, cfg, **engine_kw):
    engine = InProcessEngine(cfg, out / "cache", 6, visual=OracleVisual(cfg, out / "cache", scenes), **engine_kw)
    return run_job(videos, out, cfg, 6, progress=False, engine=engine)


def test_one_videos_failure_does_not_stop_the_job(server, tmp_path):
    videos, scenes = toy_files(tmp_path / "videos", 2)
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\x00" * 100)
    videos = sorted(videos + [str(tmp_path / "videos" / "broken.mp4")])  # broken, toy0, toy1
    server.fail(*["malformed"] * 3)  # toy0's first description: three malformed replies
    cfg = config(server, "llm.concurrency=1", "proposals.frame_stride=2")
    report = run_with_oracle(videos, scenes, tmp_path / "out", cfg, language_threads=1)
    assert (report["written"], report["failed"]) == (1, 2)
    errors = {e["video_id"]: e for e in report["errors"]}
    assert errors["broken"]["stage"] == "decode" and errors["toy0"]["stage"] == "describe"
    assert [e.video_id for e in ShardReader(tmp_path / "out")] == ["toy1"]
    lines = (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["video_id"] for line in lines) == ["broken", "toy0"]
    # the rerun retries the failed videos (from the cache where possible) and skips toy1
    rerun = run_with_oracle(videos, scenes, tmp_path / "out", cfg, language_threads=1)
    assert (rerun["already_written"], rerun["written"], rerun["failed"]) == (1, 1, 1)


def test_the_api_key_never_appears_in_logs_caches_or_outputs(server, tmp_path, capfd):
    videos, scenes = toy_files(tmp_path / "videos", 2)
    server.fail("429", "malformed", "500")  # retries and warnings get logged too
    log_lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            log_lines.append(self.format(record))

    handler = Capture(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # every library's debug output, the openai client's included
    try:
        report = run_with_oracle(videos, scenes, tmp_path / "out", config(server, "proposals.frame_stride=2"))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert report["written"] == 2 and report["usage"]["describe"]["retries"] >= 2
    assert set(server.auth_headers) == {f"Bearer {KEY}"}  # the key was really used
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10  # shards, manifest, caches, report, errors
    leaks = [str(p) for p in written if KEY.encode() in p.read_bytes()]
    assert leaks == []
    out, err = capfd.readouterr()
    assert len(log_lines) > 20 and KEY not in "\n".join(log_lines) + out + err

"""A generation job: videos in, SVG2 shards out, resumable.

Records go through `data_gen.shards.ShardWriter`, which skips the video ids its
manifest already lists: a rerun after a crash (or SIGKILL) writes each video
exactly once, and the per-video cache makes it redo nothing finished. Videos that
fail get one line each in OUT/errors.jsonl (the reason, the stage, the run) and
the job goes on; OUT/run_report.json sums up the run: counts, errors, seconds per
stage, tokens and cost per stage.
"""
from __future__ import annotations

import glob
import json
import logging
import time
import uuid
from pathlib import Path

from data_gen.pipeline.cache import append_line, atomic_write_text
from data_gen.pipeline.config import GenerateConfig
from data_gen.pipeline.engines import StageProgress, make_engine
from data_gen.pipeline.video import video_id_for
from data_gen.record import RecordError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg"}


def expand_videos(items: list[str]) -> list[str]:
    """Paths, globs and directories (their video files) -> sorted unique paths."""
    found: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += [str(p) for p in sorted(path.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES]
        elif glob.has_magic(item):
            found += sorted(glob.glob(item))
        else:
            found.append(item)  # a missing file becomes that video's error record
    out = list(dict.fromkeys(found))
    ids: dict[str, str] = {}
    for p in out:
        vid = video_id_for(p)
        if vid in ids:
            raise ValueError(f"two videos share the id {vid!r} (the file name): {ids[vid]} and {p}")
        ids[vid] = p
    return out


def run_job(videos: list[str], out_dir: str | Path, cfg: GenerateConfig, last_stage: int = 6,
            cache_dir: str | Path | None = None, progress: bool = True, engine=None, address: str | None = None) -> dict:
    """Run the stages 1..last_stage on every video not yet in OUT's manifest; returns the run report."""
    from data_gen.shards import ShardWriter

    out_dir = Path(out_dir)
    cache_root = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    run_id = uuid.uuid4().hex[:12]
    started = time.time()
    errors: list[dict] = []
    seconds: dict[str, float] = {}
    frames_done = written = 0
    with ShardWriter(out_dir, format=cfg.output.format, records_per_shard=cfg.output.records_per_shard,
                     image_format=cfg.output.image_format, max_side=cfg.output.max_side) as writer:
        jobs = [(p, video_id_for(p)) for p in videos]
        todo = [(p, v) for p, v in jobs if v not in writer.done_ids()]
        log.info("%d videos, %d already written, %d to do (stages 1-%d)", len(jobs), len(jobs) - len(todo),
                 len(todo), last_stage)
        engine = engine or make_engine(cfg, cache_root, last_stage, address)
        bars = StageProgress(len(todo), last_stage, enabled=progress)
        try:
            for result in engine.run(todo, bars):
                for stage, s in result.seconds.items():
                    seconds[stage] = seconds.get(stage, 0.0) + s
                if result.record is not None:
                    try:
                        writer.write(result.record, result.frames)
                        written += 1
                        frames_done += result.frames_processed
                        continue
                    except (RecordError, ValueError) as err:
                        result.error = {"video_id": result.video_id, "source": result.source, "stage": "write",
                                        "reason": f"{type(err).__name__}: {err}"}
                error = {**result.error, "run": run_id}
                errors.append(error)
                append_line(out_dir / "errors.jsonl", json.dumps(error))
        finally:
            bars.close()
            usage = engine.usage()
            engine.close()
    visual_s = sum(seconds.get(s, 0.0) for s in ("proposals", "tracking"))
    report = {
        "run": run_id, "videos": len(jobs), "already_written": len(jobs) - len(todo), "written": written,
        "failed": len(errors), "errors": errors, "last_stage": last_stage, "engine": cfg.engine.kind,
        "wall_s": round(time.time() - started, 2), "seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
        "frames_per_s_stages_1_2": round(frames_done / visual_s, 3) if visual_s > 0 else None,
        "usage": usage, "cost_usd": round(sum(u["cost_usd"] for u in usage.values()), 6),
    }
    atomic_write_text(out_dir / "run_report.json", json.dumps(report, indent=1))
    for stage, u in usage.items():
        log.info("%s: %d requests, %d cached, %d retries, %d prompt + %d completion tokens, $%.4f", stage,
                 u["requests"], u["cached"], u["retries"], u["prompt_tokens"], u["completion_tokens"], u["cost_usd"])
    log.info("wrote %d videos, %d failed (%s)", written, len(errors), out_dir / "errors.jsonl")
    return report

"""Engines: who runs the stage functions of `job` over many videos.

- `InProcessEngine` (default): SAM2 stages in this process, one video after
  another; the LLM stages of finished videos run meanwhile in a few threads
  (their requests are I/O). Results come back in input order.
- `RayEngine`: the same functions on a Ray cluster. The visual stages run in
  actors that keep SAM2 loaded (one per GPU, or one on a CPU-only cluster); the
  LLM stages run in one threaded actor whose client lets at most
  `llm.concurrency` requests be in flight across the cluster, with backoff on
  429 and 5xx. Results come back as they finish.
Both yield `job.VideoResult`s; the caller writes them.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from data_gen.pipeline.config import GenerateConfig
from data_gen.pipeline.job import (STAGES, LanguageStages, VideoResult, VisualOutput, VisualStages, language_step,
                                   visual_step)
from data_gen.pipeline.llm import UsageMeter


class StageProgress:
    """One tqdm bar per stage, counting videos through it."""

    def __init__(self, total: int, last_stage: int, enabled: bool = True):
        self._lock = threading.Lock()
        self.bars = {name: tqdm(total=total, desc=f"{k} {name}" if k else name, position=k, leave=True,
                                disable=not enabled, dynamic_ncols=True)
                     for k, name in enumerate(STAGES[: last_stage + 1])}

    def __call__(self, stage: str) -> None:
        with self._lock:
            if stage in self.bars:
                self.bars[stage].update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class InProcessEngine:
    def __init__(self, cfg: GenerateConfig, cache_root: str | Path, last_stage: int,
                 visual: VisualStages | None = None, language: LanguageStages | None = None, language_threads: int = 4):
        self.cfg, self.last_stage = cfg, last_stage
        self.meter = UsageMeter()
        self.visual = visual or VisualStages(cfg, cache_root)
        self.language = None
        if last_stage >= 4:
            self.language = language or LanguageStages(cfg, cache_root, self.meter)
            self.meter = self.language.meter
        self.language_threads = language_threads

    def run(self, jobs: list[tuple[str, str]], progress: StageProgress | None = None) -> Iterator[VideoResult]:
        pending: deque[Future | VideoResult] = deque()
        with ThreadPoolExecutor(max_workers=self.language_threads) as pool:
            for path, video_id in jobs:
                out = visual_step(self.visual, path, video_id, self.last_stage, progress)
                if isinstance(out, VisualOutput):
                    pending.append(pool.submit(language_step, self.language, out, self.last_stage, progress))
                else:
                    pending.append(out)
                # hand back what is done, in input order; bound the videos held in memory
                while pending and (_done(pending[0]) or len(pending) > 2 * self.language_threads):
                    yield _value(pending.popleft())
            while pending:
                yield _value(pending.popleft())

    def usage(self) -> dict:
        return self.meter.to_dict()

    def close(self) -> None:
        pass


def _done(item) -> bool:
    return not isinstance(item, Future) or item.done()


def _value(item) -> VideoResult:
    return item.result() if isinstance(item, Future) else item


class _VisualWorker:
    """Ray actor body: keeps SAM2 loaded across videos."""

    def __init__(self, cfg: GenerateConfig, cache_root: str, last_stage: int):
        import torch

        torch.set_num_threads(max(1, int(cfg.engine.threads_per_actor)))
        self.stages = VisualStages(cfg, cache_root)
        self.last_stage = last_stage

    def run(self, path: str, video_id: str):
        return visual_step(self.stages, path, video_id, self.last_stage)


class _LanguageWorker:
    """Ray actor body (threaded): the LLM stages of many videos at once, one shared client."""

    def __init__(self, cfg: GenerateConfig, cache_root: str, last_stage: int):
        self.stages = LanguageStages(cfg, cache_root)
        self.last_stage = last_stage

    def run(self, out):
        if isinstance(out, VideoResult):  # the visual stages failed: pass the error on
            return out
        return language_step(self.stages, out, self.last_stage)

    def usage(self) -> dict:
        return self.stages.meter.to_dict()


class RayEngine:
    def __init__(self, cfg: GenerateConfig, cache_root: str | Path, last_stage: int, address: str | None = None):
        import ray

        self.cfg, self.last_stage = cfg, last_stage
        self._started_ray = False
        if not ray.is_initialized():
            ray.init(address=address or cfg.engine.address, log_to_driver=True)
            self._started_ray = True
        gpus = ray.cluster_resources().get("GPU", 0.0)
        per_actor = cfg.engine.gpus_per_actor if gpus else 0.0
        count = cfg.engine.visual_actors or (max(1, int(gpus / per_actor)) if gpus else 1)
        visual_cls = ray.remote(num_cpus=cfg.engine.threads_per_actor, num_gpus=per_actor)(_VisualWorker)
        self.visual = [visual_cls.remote(cfg, str(cache_root), last_stage) for _ in range(count)]
        self.language = None
        if last_stage >= 4:
            # I/O-bound: no CPU reserved; threads = videos whose LLM stages overlap
            language_cls = ray.remote(num_cpus=0, max_concurrency=max(1, cfg.llm.concurrency))(_LanguageWorker)
            self.language = language_cls.remote(cfg, str(cache_root), last_stage)

    def run(self, jobs: list[tuple[str, str]], progress: StageProgress | None = None) -> Iterator[VideoResult]:
        import ray

        todo = deque(jobs)
        free = deque(self.visual)
        visual_refs: dict = {}  # ref -> actor
        language_refs: set = set()
        visual_names, language_names = STAGES[:4], STAGES[4: self.last_stage + 1]
        while todo or visual_refs or language_refs:
            while todo and free:
                actor = free.popleft()
                path, video_id = todo.popleft()
                visual_refs[actor.run.remote(path, video_id)] = actor
            ready, _ = ray.wait(list(visual_refs) + list(language_refs), num_returns=1)
            ref = ready[0]
            if ref in visual_refs:
                free.append(visual_refs.pop(ref))
                if self.language is None:
                    result = ray.get(ref)
                    _advance(progress, visual_names)
                    yield result
                else:
                    # the output goes to the language actor through the object store, not via this process
                    language_refs.add(self.language.run.remote(ref))
                    _advance(progress, visual_names)
            else:
                language_refs.discard(ref)
                result = ray.get(ref)
                _advance(progress, language_names)
                yield result

    def usage(self) -> dict:
        import ray

        return ray.get(self.language.usage.remote()) if self.language is not None else {}

    def close(self) -> None:
        import ray

        for actor in self.visual + ([self.language] if self.language is not None else []):
            ray.kill(actor)
        if self._started_ray:
            ray.shutdown()


def _advance(progress: StageProgress | None, names) -> None:
    for name in names if progress is not None else ():
        progress(name)


def make_engine(cfg: GenerateConfig, cache_root: str | Path, last_stage: int, address: str | None = None):
    if cfg.engine.kind == "ray":
        return RayEngine(cfg, cache_root, last_stage, address)
    return InProcessEngine(cfg, cache_root, last_stage)

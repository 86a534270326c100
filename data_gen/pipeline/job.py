"""One video through the stages, with its cache: what both engines run.

`VisualStages` (decode, 1 proposals, 2 tracking, 3 cleanup) holds SAM2, loaded
once; `LanguageStages` (4 describe, 5 parse, 6 relations) holds the LLM client
and the describer. Each stage's output is cached per video under a fingerprint
of the settings it depends on, so a rerun redoes nothing finished. Any failure
of one video becomes that video's error record (stage and reason); the job goes on.
"""
from __future__ import annotations

import hashlib
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from data_gen import rle as rle_lib
from data_gen.pipeline import cleanup as cleanup_stage
from data_gen.pipeline import proposals as proposal_stage
from data_gen.pipeline import tracking as tracking_stage
from data_gen.pipeline.cache import ResponseCache, VideoCache, masks_from_json, masks_to_json
from data_gen.pipeline.config import GenerateConfig
from data_gen.pipeline.describe import Describer, describe_objects, make_describer
from data_gen.pipeline.llm import LLMClient, LLMError, UsageMeter
from data_gen.pipeline.parse import ParsedObject, parse_descriptions
from data_gen.pipeline.relations import extract_relations
from data_gen.pipeline.tracking import Propagator, Tracks
from data_gen.pipeline.video import VideoError, decode_video, record_positions
from data_gen.record import Object, Record, Relation, Video

log = logging.getLogger(__name__)

STAGES = ("decode", "proposals", "tracking", "cleanup", "describe", "parse", "relations")  # index = stage number
OnStage = Callable[[str], None]


def parse_stages(spec: str) -> int:
    """'1-3' ... '1-6' -> the last stage to run (stages always start at 1; finished ones come from the cache)."""
    try:
        first, last = (int(x) for x in spec.split("-"))
    except ValueError:
        raise ValueError(f"--stages must look like 1-3 or 1-6, got {spec!r}") from None
    if first != 1 or not 3 <= last <= 6:
        raise ValueError(f"--stages must be 1-3, 1-4, 1-5 or 1-6 (stages start at 1; the visual stages 1-3 "
                         f"always run, from the cache when done), got {spec!r}")
    return last


def _chain(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:12]


@dataclass
class VisualOutput:
    """Stages 0-3 of one video: metadata, the record's sampled frames and the cleaned tracks on them."""
    video_id: str
    source: str
    fps: float
    num_frames: int
    frame_indices: list[int]  # native indices of the record's frames
    frames: np.ndarray  # uint8 [F, H, W, 3], the record's frames
    tracks: Tracks  # cleaned, masks on the record's frames (tracks.masks[id][j] for frames[j])
    fingerprint: str  # of everything that made the tracks
    decoded_frames: int = 0  # frames that went through stages 1-2
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    @property
    def timestamps(self) -> list[float]:
        return [round(f / self.fps, 6) for f in self.frame_indices]


@dataclass
class VideoResult:
    video_id: str
    source: str
    record: Record | None = None
    frames: np.ndarray | None = None
    error: dict | None = None  # {"video_id", "source", "stage", "reason"}
    seconds: dict[str, float] = field(default_factory=dict)
    frames_processed: int = 0  # decoded frames that went through stages 1-2


class _Clock:
    """Names the running stage (for error records and progress) and times it."""

    def __init__(self, on_stage: OnStage | None):
        self.on_stage = on_stage
        self.current = "decode"
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def begin(self, stage: str) -> None:
        self.current = stage
        self._t = time.perf_counter()

    def end(self) -> None:
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + time.perf_counter() - self._t
        if self.on_stage is not None:
            self.on_stage(self.current)


def error_result(video_id: str, source: str, stage: str, err: BaseException, seconds=None) -> VideoResult:
    reason = f"{type(err).__name__}: {err}"
    if isinstance(err, (VideoError, LLMError)):  # expected failures: the reason says it all
        log.warning("video %s failed at %s: %s", video_id, stage, reason)
    else:
        log.warning("video %s failed at %s: %s\n%s", video_id, stage, reason,
                    "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-3)))
    return VideoResult(video_id, source, error={"video_id": video_id, "source": source, "stage": stage,
                                                "reason": reason}, seconds=dict(seconds or {}))


class VisualStages:
    """Decode and stages 1-3. SAM2 is built on first use unless a segmenter/propagator is given."""

    def __init__(self, cfg: GenerateConfig, cache_root: str | Path,
                 segmenter: proposal_stage.Segmenter | None = None, propagator: Propagator | None = None):
        self.cfg = cfg
        self.cache_root = Path(cache_root)
        self._segmenter, self._propagator = segmenter, propagator

    def _models(self) -> tuple[proposal_stage.Segmenter, Propagator]:
        if self._segmenter is None or self._propagator is None:
            from data_gen.pipeline import sam2_backend

            model = sam2_backend.build_model(self.cfg.sam2)
            self._segmenter = self._segmenter or sam2_backend.Sam2MaskGenerator(model, self.cfg.proposals,
                                                                              self.cfg.sam2.bfloat16)
            self._propagator = self._propagator or sam2_backend.Sam2Propagator(model, self.cfg.sam2.bfloat16)
        return self._segmenter, self._propagator

    def fingerprints(self) -> tuple[str, str, str]:
        c = self.cfg
        proposals = c.fingerprint("decode", "sam2", "proposals")
        tracks = _chain(proposals, c.fingerprint("tracking", "record"))
        cleaned = _chain(tracks, c.fingerprint("cleanup"))
        return proposals, tracks, cleaned

    def run(self, path: str, video_id: str, on_stage: OnStage | None = None) -> VisualOutput:
        c = self.cfg
        clock = _Clock(on_stage)
        video = decode_video(path, fps=c.decode.fps, max_frames=c.decode.max_frames, video_id=video_id)
        positions = record_positions(video, c.record.min_frames, c.record.max_frames)
        clock.end()
        cache = VideoCache(self.cache_root, video_id)
        fp_props, fp_tracks, fp_clean = self.fingerprints()

        clock.begin("proposals")
        cleaned = cache.load("objects", fp_clean)
        tracks_json = cleaned or cache.load("tracks", fp_tracks)
        props = None
        if tracks_json is None:
            stored = cache.load("proposals", fp_props)
            if stored is not None:
                props = masks_from_json(stored)
            else:
                segmenter, _ = self._models()
                props = proposal_stage.propose(video.frames, segmenter, c.proposals.frame_stride,
                                               c.proposals.max_covered)
                cache.save("proposals", fp_props, masks_to_json(props))
        clock.end()

        clock.begin("tracking")
        if tracks_json is None:
            _, propagator = self._models()
            tracks = tracking_stage.track(propagator, video.frames, props, c.proposals.frame_stride, c.tracking,
                                          positions)
            cache.save("tracks", fp_tracks, tracks.to_dict())
        elif cleaned is None:
            tracks = Tracks.from_dict(tracks_json)
        clock.end()

        clock.begin("cleanup")
        if cleaned is None:
            tracks = cleanup_stage.cleanup(tracks, c.cleanup)
            cache.save("objects", fp_clean, tracks.to_dict())
        else:
            tracks = Tracks.from_dict(cleaned)
        clock.end()
        return VisualOutput(video_id=video.video_id, source=video.source, fps=video.fps,
                            num_frames=video.num_frames, frame_indices=[video.frame_indices[p] for p in positions],
                            frames=video.frames[positions], tracks=tracks, fingerprint=fp_clean,
                            decoded_frames=len(video.frames), seconds=clock.seconds)


def visual_from_record(record: Record, frames: np.ndarray) -> VisualOutput:
    """A record's masks as if stages 1-3 had made them (e.g. to run stages 4-6 on given tracks)."""
    v = record.video
    tracks = Tracks(positions=list(range(len(v.frame_indices))), height=v.height, width=v.width,
                    masks={o.id: list(o.masks) for o in record.objects}, seeds={o.id: 0 for o in record.objects})
    fingerprint = hashlib.sha256(record.to_json().encode()).hexdigest()[:12]
    return VisualOutput(video_id=v.id, source=v.source, fps=v.fps, num_frames=v.num_frames,
                        frame_indices=list(v.frame_indices), frames=frames, tracks=tracks, fingerprint=fingerprint,
                        decoded_frames=len(frames))


def build_record(visual: VisualOutput, names: dict[int, ParsedObject] | None = None,
                 descriptions: dict[int, str] | None = None, relations: list[Relation] | None = None) -> Record:
    """The record of one video. Objects are renumbered 1..K by first appearance; with `names`,
    only the named (described) objects are kept."""
    t = visual.tracks
    keep = sorted(names) if names is not None else t.ids
    first = {i: next(j for j, m in enumerate(t.masks[i]) if rle_lib.area(m) > 0) for i in keep}
    order = sorted(keep, key=lambda i: (first[i], i))
    objects = []
    for new_id, old_id in enumerate(order, start=1):
        parsed = names.get(old_id) if names else None
        objects.append(Object(id=new_id, name=parsed.name if parsed else "",
                              attributes=list(parsed.attributes) if parsed else [],
                              masks=list(t.masks[old_id]),
                              description=(descriptions or {}).get(old_id), uncertain=bool(parsed and parsed.uncertain)))
    h, w = visual.frames.shape[1:3]
    video = Video(id=visual.video_id, source=visual.source, fps=visual.fps, num_frames=visual.num_frames,
                  width=int(w), height=int(h), frame_indices=list(visual.frame_indices), timestamps=visual.timestamps)
    return Record(video=video, objects=objects, relations=list(relations or []))


def visual_only_result(visual: VisualOutput) -> VideoResult:
    record = build_record(visual).validate()
    return VideoResult(visual.video_id, visual.source, record=record, frames=visual.frames,
                       seconds=dict(visual.seconds), frames_processed=visual.decoded_frames)


class LanguageStages:
    """Stages 4-6 on the output of the visual stages."""

    def __init__(self, cfg: GenerateConfig, cache_root: str | Path, meter: UsageMeter | None = None,
                 llm: LLMClient | None = None, describer: Describer | None = None):
        self.cfg = cfg
        self.cache_root = Path(cache_root)
        self.meter = meter or UsageMeter()
        self.llm = llm or LLMClient(cfg.llm, ResponseCache(self.cache_root), self.meter)
        self._describer = describer

    def describer(self) -> Describer:
        if self._describer is None:
            from data_gen.pipeline.sam2_backend import resolve_device

            self._describer = make_describer(self.cfg.describe, self.llm, str(resolve_device(self.cfg.sam2.device)))
        return self._describer

    def run(self, visual: VisualOutput, last_stage: int, on_stage: OnStage | None = None
            ) -> tuple[Record, dict[str, float]]:
        c = self.cfg
        clock = _Clock(on_stage)
        cache = VideoCache(self.cache_root, visual.video_id)
        fp_desc = _chain(visual.fingerprint, c.fingerprint("describe"))
        fp_names = _chain(fp_desc, c.fingerprint("parse"))
        fp_rel = _chain(fp_names, c.fingerprint("relations"))

        clock.begin("describe")
        stored = cache.load("descriptions", fp_desc)
        if stored is None:
            descriptions = describe_objects(visual.frames, visual.tracks, self.describer(), c.describe,
                                            threads=c.llm.concurrency)
            cache.save("descriptions", fp_desc, {str(k): v for k, v in descriptions.items()})
        else:
            descriptions = {int(k): v for k, v in stored.items()}
        clock.end()
        names = None
        if last_stage >= 5:
            clock.begin("parse")
            stored = cache.load("names", fp_names)
            if stored is None:
                names = parse_descriptions(self.llm, c.parse, descriptions, threads=c.llm.concurrency)
                cache.save("names", fp_names, {str(k): v.to_dict() for k, v in names.items()})
            else:
                names = {int(k): ParsedObject(**v) for k, v in stored.items()}
            clock.end()
        if names is None:  # stage 4 alone: keep the described objects, unnamed
            names_for_record = None
            visual = _only(visual, sorted(descriptions))
        else:
            names_for_record = names
        record = build_record(visual, names_for_record, descriptions)
        if last_stage >= 6:
            clock.begin("relations")
            stored = cache.load("relations", fp_rel)
            if stored is None:
                result = extract_relations(self.llm, c.relations, record, visual.frames)
                stored = {"relations": [_relation_dict(r) for r in result.relations], "dropped": result.dropped}
                cache.save("relations", fp_rel, stored)
            record.relations = [Relation(subject=r["subject"], predicate=r["predicate"], object=r["object"],
                                         category=r["category"], spans=[tuple(s) for s in r["spans"]])
                                for r in stored["relations"]]
            clock.end()
        return record.validate(), clock.seconds


def _only(visual: VisualOutput, ids: list[int]) -> VisualOutput:
    t = visual.tracks
    tracks = Tracks(positions=t.positions, height=t.height, width=t.width,
                    masks={i: t.masks[i] for i in ids}, seeds={i: t.seeds[i] for i in ids if i in t.seeds})
    return VisualOutput(visual.video_id, visual.source, visual.fps, visual.num_frames, visual.frame_indices,
                        visual.frames, tracks, visual.fingerprint)


def _relation_dict(r: Relation) -> dict:
    return {"subject": r.subject, "predicate": r.predicate, "object": r.object, "category": r.category,
            "spans": [list(s) for s in r.spans]}


class _StageTracker:
    """Follows which stage is running, for the error record."""

    def __init__(self, on_stage: OnStage | None, current: str):
        self.on_stage = on_stage
        self.current = current

    def __call__(self, done: str) -> None:
        nxt = STAGES.index(done) + 1
        self.current = STAGES[nxt] if nxt < len(STAGES) else done
        if self.on_stage is not None:
            self.on_stage(done)


def visual_step(visual: VisualStages, path: str, video_id: str, last_stage: int,
                on_stage: OnStage | None = None) -> VideoResult | VisualOutput:
    """Stages 0-3: the final result (an error, or the record when stages end at 3), else the output to go on with."""
    tracker = _StageTracker(on_stage, "decode")
    try:
        out = visual.run(path, video_id, tracker)
        return visual_only_result(out) if last_stage <= 3 else out
    except Exception as err:  # one video's failure never stops the job
        return error_result(video_id, path, tracker.current, err)


def language_step(language: LanguageStages, out: VisualOutput, last_stage: int,
                  on_stage: OnStage | None = None) -> VideoResult:
    tracker = _StageTracker(on_stage, "describe")
    try:
        record, seconds = language.run(out, last_stage, tracker)
    except Exception as err:
        return error_result(out.video_id, out.source, tracker.current, err, out.seconds)
    return VideoResult(out.video_id, out.source, record=record, frames=out.frames, seconds={**out.seconds, **seconds},
                       frames_processed=out.decoded_frames)


def process_video(path: str, video_id: str, visual: VisualStages, language: LanguageStages | None,
                  last_stage: int, on_stage: OnStage | None = None) -> VideoResult:
    """Every requested stage on one video; failures become the video's error record."""
    out = visual_step(visual, path, video_id, last_stage, on_stage)
    if isinstance(out, VideoResult):
        return out
    return language_step(language, out, last_stage, on_stage)

"""Per-video cache of intermediate results, and the LLM response cache.

Layout under the cache root (default OUT/cache):

    videos/<video_id>/<stage>-<fingerprint>.json   proposals, tracks, objects, descriptions, names, relations
    llm/<hh>/<sha256 of the request>.json          one validated reply per distinct request

A stage's fingerprint hashes the settings it depends on (and its inputs'), so a
changed setting recomputes that stage and everything after it. Every write goes
to a temporary file that is renamed into place: a killed run leaves either the
old file or the new one, never half of one. Nothing here ever holds the API key:
requests are hashed without it and replies hold only the model's content and
token counts.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from data_gen import rle as rle_lib


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line durably (a killed run loses at most the line being written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


class VideoCache:
    """The cached stage outputs of one video."""

    def __init__(self, root: str | Path, video_id: str):
        self.dir = Path(root) / "videos" / video_id

    def _path(self, stage: str, fingerprint: str) -> Path:
        return self.dir / f"{stage}-{fingerprint}.json"

    def load(self, stage: str, fingerprint: str) -> Any | None:
        path = self._path(stage, fingerprint)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # unreadable (cannot happen with atomic writes, but never trust it): recompute

    def save(self, stage: str, fingerprint: str, value: Any) -> None:
        atomic_write_text(self._path(stage, fingerprint), json.dumps(value, separators=(",", ":")))


class ResponseCache:
    """Validated LLM replies keyed by the sha256 of the canonical request."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / "llm"

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def put(self, key: str, value: dict) -> None:
        atomic_write_text(self._path(key), json.dumps(value, separators=(",", ":")))


def masks_to_json(masks_by_frame: dict[int, list[np.ndarray]]) -> dict[str, list[dict]]:
    return {str(p): [rle_lib.encode(m) for m in ms] for p, ms in masks_by_frame.items()}


def masks_from_json(d: dict[str, list[dict]]) -> dict[int, list[np.ndarray]]:
    return {int(p): [rle_lib.decode(r).astype(bool) for r in rs] for p, rs in d.items()}

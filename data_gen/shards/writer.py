"""ShardWriter: records + frames -> shards and manifest, atomic and resumable.

A shard is written under `<name>.incomplete` and renamed into place once full;
then the manifest, the only thing readers trust, is replaced atomically. A
writer killed at any point therefore leaves the last complete state. Opening
a directory again resumes: videos the manifest lists are skipped, leftovers of
the killed run (temp files, a renamed shard the manifest never listed) are
removed, and the next shard takes the next index. Since an unfinished shard is
dropped whole, a killed-and-rerun job ends with the same bytes as a job that
ran through.

One writer per directory at a time (an advisory lock enforces it).
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Set as AbstractSet
from pathlib import Path

import numpy as np

from data_gen.record import Record
from data_gen.shards import manifest as mf
from data_gen.shards.payload import IMAGE_FORMATS, encode_payload
from data_gen.shards.tfrecord_io import write_record

TEMP_SUFFIX = ".incomplete"
LOCK_NAME = ".writer.lock"


class _ArrayRecordSink:
    def __init__(self, path: Path):
        from array_record.python.array_record_module import ArrayRecordWriter
        # group_size:1 = one record per chunk: the fastest random access (what TFDS writes too).
        self._writer = ArrayRecordWriter(os.fspath(path), "group_size:1")

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def close(self) -> None:
        self._writer.close()


class _TFRecordSink:
    def __init__(self, path: Path):
        self._file = open(path, "wb")

    def write(self, data: bytes) -> None:
        write_record(self._file, data)

    def close(self) -> None:
        self._file.close()


_SINKS = {"arrayrecord": _ArrayRecordSink, "tfrecord": _TFRecordSink}


class _ReadOnlySet(AbstractSet):
    def __init__(self, items: set):
        self._items = items

    def __contains__(self, item) -> bool:
        return item in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{{{', '.join(map(repr, sorted(self._items)))}}}"


class ShardWriter:
    """Context manager writing `manifest.json` and shards into `out_dir`.

        with ShardWriter(out_dir, format="arrayrecord") as writer:
            for video_id in todo:
                if video_id in writer.done_ids():
                    continue  # written by an earlier (killed) run
                writer.write(record, frames)  # frames: uint8 [T, H, W, 3]
    """

    def __init__(self, out_dir: str | os.PathLike, format: str = "arrayrecord", records_per_shard: int = 32,
                 image_format: str = "jpeg", max_side: int = 448, jpeg_quality: int = 90, split: str = "train"):
        if format not in _SINKS:
            raise ValueError(f"format is {format!r}, expected one of {tuple(_SINKS)}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format is {image_format!r}, expected one of {IMAGE_FORMATS}")
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
        if max_side < 1:
            raise ValueError(f"max_side must be positive, got {max_side}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
        if not split.isidentifier():
            raise ValueError(f"split must be a name like 'train' (letters, digits, _), got {split!r}")
        self.out_dir = Path(out_dir)
        self.settings = dict(split=split, format=format, image_format=image_format, max_side=int(max_side),
                             jpeg_quality=int(jpeg_quality), records_per_shard=int(records_per_shard))
        self._manifest: dict | None = None
        self._lock_fd: int | None = None
        self._done: set[str] = set()
        self._open_shard: dict | None = None  # stats of the shard being written
        self._sink = None

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> "ShardWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error the unfinished shard is dropped, exactly as if killed.
        self.close(commit=exc_type is None)

    def open(self) -> None:
        if self._manifest is not None:
            raise mf.ShardError(f"this ShardWriter is already open on {self.out_dir}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise mf.ShardError(f"another ShardWriter is writing {self.out_dir}") from None
        try:
            self._manifest = self._load_or_create_manifest()
            self._done = {vid for shard in self._manifest["shards"] for vid in shard["video_ids"]}
            self._remove_leftovers()
        except BaseException:
            self._manifest = None
            self._release_lock()
            raise

    def _load_or_create_manifest(self) -> dict:
        wanted = mf.new_manifest(**self.settings)
        if not (self.out_dir / mf.MANIFEST_NAME).exists():
            return wanted
        manifest = mf.read_manifest(self.out_dir)
        for key in mf.PAYLOAD_SETTINGS:
            if manifest.get(key) != wanted[key]:
                raise mf.ShardError(f"{self.out_dir} holds shards with {key}={manifest.get(key)!r}; "
                                    f"this writer has {key}={wanted[key]!r}")
        manifest["records_per_shard"] = self.settings["records_per_shard"]
        return manifest

    def close(self, commit: bool = True) -> None:
        if self._manifest is None:
            return
        try:
            if self._open_shard is not None:
                if commit:
                    self._commit_shard()
                else:
                    self._abandon_shard()
            elif commit and not (self.out_dir / mf.MANIFEST_NAME).exists():
                mf.write_manifest(self.out_dir, self._manifest)  # an empty job still leaves a readable dir
        finally:
            self._manifest = None
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _remove_leftovers(self) -> None:
        """Temp files of a killed run, and shards the manifest never listed."""
        listed = {s["file"] for s in self._manifest["shards"]}
        ours = mf.shard_file_pattern(self.settings["split"])
        for path in self.out_dir.iterdir():
            name = path.name
            stem = name[:-len(TEMP_SUFFIX)] if name.endswith(TEMP_SUFFIX) else None
            if stem == mf.MANIFEST_NAME or (stem and ours.fullmatch(stem)):
                path.unlink()
            elif ours.fullmatch(name) and name not in listed:
                path.unlink()

    # -- writing --------------------------------------------------------------
    def done_ids(self) -> AbstractSet[str]:
        """Video ids this writer will skip: in the manifest, or in the shard being written.

        A live read-only view (O(1) `in`, no copy), so a job can test every video."""
        return _ReadOnlySet(self._done)

    def write(self, record: Record, frames: np.ndarray) -> bool:
        """Validate and append one video; False (nothing written) when its id is already done.

        Raises RecordError for an invalid record and ValueError for frames that do
        not fit it; nothing is written then."""
        if self._manifest is None:
            raise mf.ShardError("ShardWriter is not open: use it as a context manager (with ShardWriter(...) as w)")
        record.validate()
        if record.video.id in self._done:
            return False
        payload = encode_payload(record, frames, image_format=self.settings["image_format"],
                                 max_side=self.settings["max_side"], jpeg_quality=self.settings["jpeg_quality"])
        if self._open_shard is None:
            index = len(self._manifest["shards"])
            name = mf.shard_file_name(self.settings["split"], self.settings["format"], index)
            self._open_shard = {"file": name, "records": 0, "video_ids": [], "objects": 0, "relations": 0,
                                "frames": 0}
            self._sink = _SINKS[self.settings["format"]](self._temp_path())
        self._sink.write(payload)
        shard = self._open_shard
        shard["records"] += 1
        shard["video_ids"].append(record.video.id)
        shard["objects"] += len(record.objects)
        shard["relations"] += len(record.relations)
        shard["frames"] += len(record.video.frame_indices)
        self._done.add(record.video.id)
        if shard["records"] >= self.settings["records_per_shard"]:
            self._commit_shard()
        return True

    def _temp_path(self) -> Path:
        return self.out_dir / (self._open_shard["file"] + TEMP_SUFFIX)

    def _commit_shard(self) -> None:
        self._sink.close()
        temp, final = self._temp_path(), self.out_dir / self._open_shard["file"]
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, final)
        mf.fsync_dir(self.out_dir)
        shard = dict(self._open_shard, bytes=final.stat().st_size, sha256=mf.sha256_file(final))
        self._manifest["shards"].append(shard)
        mf.recount(self._manifest)
        mf.write_manifest(self.out_dir, self._manifest)
        self._open_shard, self._sink = None, None

    def _abandon_shard(self) -> None:
        self._sink.close()
        self._temp_path().unlink(missing_ok=True)
        for vid in self._open_shard["video_ids"]:
            self._done.discard(vid)
        self._open_shard, self._sink = None, None

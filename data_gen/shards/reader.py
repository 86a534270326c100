"""ShardReader: random access over the shards a manifest lists (and nothing else).

Picklable: file handles are opened lazily and reopened in a new process, so
grain can use a ShardReader as its data source with worker processes.
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Iterator

from data_gen.shards import manifest as mf
from data_gen.shards.payload import Example, decode_payload
from data_gen.shards.tfrecord_io import read_record_at, record_offsets

_ITER_CHUNK = 16  # records per ArrayRecord range read while iterating


class _ArrayRecordShard:
    def __init__(self, path: Path):
        from array_record.python.array_record_module import ArrayRecordReader
        self._reader = ArrayRecordReader(os.fspath(path), "readahead_buffer_size:0,max_parallelism:0")

    def __len__(self) -> int:
        return self._reader.num_records()

    def read(self, start: int, stop: int) -> list[bytes]:
        return self._reader.read(start, stop)

    def close(self) -> None:
        self._reader.close()


class _TFRecordShard:
    def __init__(self, path: Path):
        self._offsets = record_offsets(path)
        self._file = open(path, "rb")

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, start: int, stop: int) -> list[bytes]:
        return [read_record_at(self._file, o) for o in self._offsets[start:stop]]

    def close(self) -> None:
        self._file.close()


_SHARD_TYPES = {"arrayrecord": _ArrayRecordShard, "tfrecord": _TFRecordShard}


class ShardReader:
    """Examples of a shard directory in manifest order: `len`, `[i]`, iteration, `ids()`."""

    def __init__(self, shard_dir: str | os.PathLike):
        self.shard_dir = Path(shard_dir)
        self.manifest = mf.read_manifest(self.shard_dir)
        self.format = self.manifest["format"]
        if self.format not in _SHARD_TYPES:
            raise mf.ShardError(f"{self.shard_dir}: manifest format is {self.format!r}, "
                                f"expected one of {tuple(_SHARD_TYPES)}")
        self._shards = self.manifest["shards"]
        self._ids = [vid for s in self._shards for vid in s["video_ids"]]
        self._starts = [0]
        for s in self._shards:
            self._starts.append(self._starts[-1] + s["records"])
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    # -- grain's RandomAccessDataSource protocol --------------------------------
    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> Example:
        return decode_payload(self.read_bytes(index))

    def read_bytes(self, index: int) -> bytes:
        """The serialized tf.train.Example of video `index` (manifest order)."""
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} videos in {self.shard_dir}")
        shard = bisect.bisect_right(self._starts, i) - 1
        local = i - self._starts[shard]
        return self._shard(shard).read(local, local + 1)[0]

    def __iter__(self) -> Iterator[Example]:
        for shard, entry in enumerate(self._shards):
            for start in range(0, entry["records"], _ITER_CHUNK):
                for data in self._shard(shard).read(start, min(start + _ITER_CHUNK, entry["records"])):
                    yield decode_payload(data)

    def ids(self) -> list[str]:
        return list(self._ids)

    def verify(self) -> None:
        """Recompute every listed shard's size, sha256 and record count; ShardError on a mismatch."""
        for shard, entry in enumerate(self._shards):
            path = self.shard_dir / entry["file"]
            if not path.is_file():
                raise mf.ShardError(f"{path} is listed in the manifest but missing")
            if path.stat().st_size != entry["bytes"] or mf.sha256_file(path) != entry["sha256"]:
                raise mf.ShardError(f"{path} does not match its manifest size/sha256 ({entry['sha256']})")
            self._shard(shard)  # opening checks the record count

    # -- handles ---------------------------------------------------------------
    def _shard(self, shard: int):
        if self._pid != os.getpid():  # forked: the parent's handles are not ours
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            entry = self._shards[shard]
            path = self.shard_dir / entry["file"]
            if not path.is_file():
                raise mf.ShardError(f"{path} is listed in the manifest but missing")
            handle = _SHARD_TYPES[self.format](path)
            if len(handle) != entry["records"]:
                handle.close()
                raise mf.ShardError(f"{path} holds {len(handle)} records, the manifest says {entry['records']}")
            self._handles[shard] = handle
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"ShardReader({str(self.shard_dir)!r}, format={self.format!r}, videos={len(self)})"

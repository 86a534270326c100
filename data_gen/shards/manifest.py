"""The shard directory's `manifest.json`: what a reader may read.

Readers trust only the manifest: a shard exists for them once the manifest lists
it, and the manifest is only ever replaced atomically (tmp + fsync + os.replace)
after the shard it adds has been renamed into place. The content is
deterministic (sorted keys, no timestamps), so equal inputs give equal bytes.

Layout:
  {"manifest_version": 1, "record_schema_version": 1, "dataset": "svg2",
   "split": "train", "format": "arrayrecord", "image_format": "jpeg",
   "max_side": 448, "jpeg_quality": 90, "records_per_shard": 32,
   "counts": {"videos": N, "objects": N, "relations": N, "frames": N},
   "shards": [{"file": "svg2-train.array_record-00000", "records": n,
               "video_ids": [...], "bytes": n, "sha256": "...",
               "objects": n, "relations": n, "frames": n}, ...]}
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from data_gen.record import SCHEMA_VERSION

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
DATASET_NAME = "svg2"
# Shard format -> file suffix; the suffixes are TFDS's FILEFORMAT names, and the
# file names follow the TFDS template "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}".
FILE_SUFFIX = {"arrayrecord": "array_record", "tfrecord": "tfrecord"}
COUNT_KEYS = ("videos", "objects", "relations", "frames")
# Settings that change the payload bytes: a resumed job must use the same ones.
PAYLOAD_SETTINGS = ("record_schema_version", "dataset", "split", "format", "image_format", "max_side",
                    "jpeg_quality")


class ShardError(RuntimeError):
    """A shard directory that is missing, inconsistent or corrupted."""


def shard_file_name(split: str, format: str, index: int) -> str:
    return f"{DATASET_NAME}-{split}.{FILE_SUFFIX[format]}-{index:05d}"


def shard_file_pattern(split: str) -> re.Pattern:
    """Matches every shard file name of `split`, in any format."""
    suffixes = "|".join(FILE_SUFFIX.values())
    return re.compile(rf"{DATASET_NAME}-{re.escape(split)}\.({suffixes})-\d{{5,}}")


def new_manifest(*, split: str, format: str, image_format: str, max_side: int, jpeg_quality: int,
                 records_per_shard: int) -> dict:
    return {"manifest_version": MANIFEST_VERSION, "record_schema_version": SCHEMA_VERSION,
            "dataset": DATASET_NAME, "split": split, "format": format, "image_format": image_format,
            "max_side": max_side, "jpeg_quality": jpeg_quality, "records_per_shard": records_per_shard,
            "counts": {k: 0 for k in COUNT_KEYS}, "shards": []}


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{path} does not exist: {shard_dir} is not a shard directory (or holds no complete shard)")
    manifest = json.loads(path.read_text())
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest_version is {manifest.get('manifest_version')!r}, "
                         f"this code reads {MANIFEST_VERSION}")
    return manifest


def recount(manifest: dict) -> None:
    manifest["counts"] = {"videos": sum(s["records"] for s in manifest["shards"]),
                          **{k: sum(s[k] for s in manifest["shards"]) for k in COUNT_KEYS[1:]}}


def write_manifest(shard_dir: str | os.PathLike, manifest: dict) -> None:
    """Atomically replace the manifest: readers see the old one or the new one, never a mix."""
    shard_dir = Path(shard_dir)
    tmp = shard_dir / (MANIFEST_NAME + ".incomplete")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, shard_dir / MANIFEST_NAME)
    fsync_dir(shard_dir)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry must be synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

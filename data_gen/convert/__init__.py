"""Public benchmarks -> records (and shards): PVSG, VidOR, VIPSeg, SVG2 parquet.

    python -m data_gen.convert BENCHMARK SRC OUT [--split val] [--frames DIR] [--videos DIR]

Each converter yields `ConvertedVideo(record, load_frames, frame_source)`;
evaluation needs only the records (`iter_records`), shards need the frames too.
The formats each converter reads are cited in its module docstring.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from data_gen.convert.frames import ConvertedVideo, ConvertError
from data_gen.record import Record

BENCHMARKS = ("pvsg", "vidor", "vipseg", "svg2")


def iter_videos(benchmark: str, src: str | Path, **options: Any) -> Iterator[ConvertedVideo]:
    """options: split (pvsg, vipseg), frames_dir / videos_dir (vidor, svg2), fps (vipseg)."""
    if benchmark == "pvsg":
        from data_gen.convert import pvsg as module
    elif benchmark == "vidor":
        from data_gen.convert import vidor as module
    elif benchmark == "vipseg":
        from data_gen.convert import vipseg as module
    elif benchmark == "svg2":
        from data_gen.convert import svg2_parquet as module
    else:
        raise ConvertError(f"benchmark is {benchmark!r}, expected one of {BENCHMARKS}")
    return module.iter_videos(src, **{k: v for k, v in options.items() if v is not None})


def iter_records(benchmark: str, src: str | Path, **options: Any) -> Iterator[Record]:
    for video in iter_videos(benchmark, src, **options):
        yield video.record


__all__ = ["BENCHMARKS", "ConvertError", "ConvertedVideo", "iter_records", "iter_videos"]

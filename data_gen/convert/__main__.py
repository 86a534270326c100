"""python -m data_gen.convert BENCHMARK SRC OUT: a benchmark's annotations and frames -> shards.

Resumable: videos already in OUT's manifest are skipped (data_gen.shards.ShardWriter).
"""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from data_gen.convert import BENCHMARKS, ConvertError, iter_videos

# The keyword options each converter takes.
OPTIONS = {"pvsg": ("split",), "vidor": ("frames_dir", "videos_dir"), "vipseg": ("split", "fps"),
           "svg2": ("frames_dir", "videos_dir")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_gen.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=BENCHMARKS)
    parser.add_argument("src", help="pvsg: pvsg.json or its folder; vidor: annotation folder or JSON; "
                                    "vipseg: the VIPSeg folder; svg2: a .parquet file or a folder of them")
    parser.add_argument("out", help="shard directory to write (or resume)")
    parser.add_argument("--split", help="pvsg: train/val from pvsg.json; vipseg: the videos listed in SPLIT.txt")
    parser.add_argument("--frames", help="vidor, svg2: folder of extracted frames, one subfolder per video")
    parser.add_argument("--videos", help="vidor, svg2: folder of the video files (decoded with PyAV)")
    parser.add_argument("--fps", type=float, help="vipseg: frame rate to assume (default 5)")
    parser.add_argument("--format", default="arrayrecord", choices=("arrayrecord", "tfrecord"))
    parser.add_argument("--records-per-shard", type=int, default=32)
    parser.add_argument("--max-side", type=int, default=448, help="frames are stored at most this large")
    parser.add_argument("--image-format", default="jpeg", choices=("jpeg", "png"))
    parser.add_argument("--limit", type=int, help="convert at most this many videos")
    args = parser.parse_args(argv)

    from data_gen.shards import ShardWriter

    given = {"split": args.split, "fps": args.fps, "frames_dir": args.frames, "videos_dir": args.videos}
    flags = {"split": "--split", "fps": "--fps", "frames_dir": "--frames", "videos_dir": "--videos"}
    unused = [flags[k] for k, v in given.items() if v is not None and k not in OPTIONS[args.benchmark]]
    if unused:
        parser.error(f"{', '.join(unused)} does not apply to {args.benchmark}")
    options = {k: given[k] for k in OPTIONS[args.benchmark]}
    written = skipped = 0
    try:
        with ShardWriter(args.out, format=args.format, records_per_shard=args.records_per_shard,
                         image_format=args.image_format, max_side=args.max_side) as writer:
            done = writer.done_ids()
            for k, video in enumerate(tqdm(iter_videos(args.benchmark, args.src, **options),
                                           desc=f"{args.benchmark} -> {args.out}", unit="video")):
                if args.limit is not None and k >= args.limit:
                    break
                if video.record.video.id in done:
                    skipped += 1
                    continue
                if video.load_frames is None:
                    raise ConvertError(f"video {video.record.video.id!r}: {video.frame_source}; shards need frames "
                                       f"(give --frames or --videos). To score predictions, "
                                       f"`python -m traser_jax.evaluate --benchmark {args.benchmark} --gt {args.src}` "
                                       f"reads the annotations without frames.")
                writer.write(video.record, video.load_frames())
                written += 1
    except (ConvertError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} videos to {args.out} ({skipped} already there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

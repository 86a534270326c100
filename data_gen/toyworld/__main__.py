"""python -m data_gen.toyworld --num-videos N --out DIR --seed S [--format arrayrecord|tfrecord]

Writes toyworld videos (ids toy-S-000000 ...) as shards plus manifest through
`data_gen.shards.ShardWriter`. Deterministic: the same arguments give
byte-identical shards. Rerunning on a directory a killed run left completes it
(videos the manifest already lists are skipped).
"""
from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from data_gen.shards import ShardError, ShardWriter, read_manifest
from data_gen.toyworld.generate import generate_video
from data_gen.toyworld.world import ToyworldConfig


def write_shards(args: argparse.Namespace) -> None:
    with ShardWriter(args.out, format=args.format, records_per_shard=args.records_per_shard,
                     image_format=args.image_format, max_side=args.max_side, split=args.split) as writer:
        done = writer.done_ids()
        for index in tqdm(range(args.num_videos), desc="toyworld", unit="video", file=sys.stderr):
            if f"toy-{args.seed}-{index:06d}" in done:
                continue  # written by an earlier run
            record, frames = generate_video(args.seed, index, **args.knobs)
            writer.write(record, frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_gen.toyworld", description=__doc__.split("\n\n")[1])
    parser.add_argument("--num-videos", type=int, required=True, help="videos to generate (indices 0..N-1)")
    parser.add_argument("--out", required=True, help="shard directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (video i is generate_video(seed, i))")
    parser.add_argument("--format", choices=("arrayrecord", "tfrecord"), default="arrayrecord")
    parser.add_argument("--records-per-shard", type=int, default=32)
    parser.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--max-side", type=int, default=448, help="stored frames are shrunk to this longer side")
    parser.add_argument("--split", default="train", help="split name in the shard file names")
    parser.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE",
                        help="a ToyworldConfig knob, e.g. --knob max_objects=4 --knob fps_choices=[1,2]")
    args = parser.parse_args(argv)
    try:
        args.knobs = ToyworldConfig.parse_knobs(args.knob)
    except (ValueError, TypeError) as err:
        parser.error(f"--knob: {err}")
    if args.num_videos < 0:
        parser.error(f"--num-videos must be >= 0, got {args.num_videos}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        write_shards(args)
    except (ShardError, ValueError) as err:  # e.g. a directory written with other settings
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = read_manifest(args.out)
    print(json.dumps({"out": args.out, "format": manifest["format"], "shards": len(manifest["shards"]),
                      **manifest["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

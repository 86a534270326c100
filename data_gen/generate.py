"""Generate SVG2 scene-graph shards from video files.

    python -m data_gen.generate --videos 'clips/*.mp4' --out shards/ [--config configs/svg2_generate.yaml]
        [--stages 1-3] [--engine inprocess|ray] [--address ADDR] [--sam2-checkpoint PATH]
        [--set section.key=value ...]

Stages: 1 SAM2 proposals, 2 online-offline tracking, 3 cleanup (visual, no
endpoint needed), 4 descriptions, 5 names and attributes, 6 relations (an
OpenAI-compatible endpoint: `llm.base_url`, key in $OPENAI_API_KEY or the
variable `llm.api_key_env` names). Rerunning the same command resumes: written
videos are skipped and finished stages come from OUT/cache.
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_gen.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", nargs="+", required=True, help="video files, globs (quote them) or directories")
    ap.add_argument("--out", required=True, help="output directory (shards, manifest, errors.jsonl, run_report.json)")
    ap.add_argument("--config", default=None, help="settings YAML (default: configs/svg2_generate.yaml)")
    ap.add_argument("--stages", default="1-6", help="1-3 (visual only) ... 1-6 (default)")
    ap.add_argument("--engine", choices=["inprocess", "ray"], default=None)
    ap.add_argument("--address", default=None, help="Ray cluster address (implies --engine ray; default: a local Ray)")
    ap.add_argument("--sam2-checkpoint", default=None, help="SAM2 weights (.pt); without it: random weights")
    ap.add_argument("--cache", default=None, help="cache directory (default: OUT/cache)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set sam2.image_size=512 (repeatable)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    # our loggers at the requested level; libraries (SAM2 logs every image embedding) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("data_gen").setLevel(args.log_level.upper())

    from data_gen.pipeline.config import load_config
    from data_gen.pipeline.job import parse_stages
    from data_gen.pipeline.run import expand_videos, run_job

    overrides = list(args.overrides)
    engine = args.engine or ("ray" if args.address else None)  # an address means a Ray cluster
    if engine:
        overrides.append(f"engine.kind={engine}")
    if args.sam2_checkpoint:
        overrides.append(f"sam2.checkpoint={args.sam2_checkpoint}")
    try:
        cfg = load_config(args.config, overrides)
        last_stage = parse_stages(args.stages)
        videos = expand_videos(args.videos)
    except ValueError as err:
        ap.error(str(err))
    if not videos:
        ap.error(f"no video matches {args.videos}")
    report = run_job(videos, args.out, cfg, last_stage, cache_dir=args.cache, progress=not args.no_progress,
                     address=args.address)
    print(f"written {report['written']}, already written {report['already_written']}, failed {report['failed']}, "
          f"cost ${report['cost_usd']:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

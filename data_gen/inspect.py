"""python -m data_gen.inspect DIR [--render VIDEO_ID --out FILE.png]

Summarizes a shard directory as one JSON object on stdout: counts (videos,
objects, attributes, relations, frames, shards), format, whether the shard
checksums match the manifest, durations, frame rates, frame sizes, and
histograms of object names, attribute values, predicates and categories.
With --render, draws that video's scene graph (`data_gen.render`) instead and
prints where it went.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from data_gen.shards import ShardError, ShardReader


def _histogram(counter: Counter) -> dict[str, int]:
    return {k: v for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def summarize(shard_dir: str) -> dict:
    """The summary `python -m data_gen.inspect DIR` prints."""
    with ShardReader(shard_dir) as reader:
        manifest = reader.manifest
        try:
            reader.verify()
            checksums_ok = True
        except ShardError:
            checksums_ok = False
        names, attrs, predicates, categories, fps = Counter(), Counter(), Counter(), Counter(), Counter()
        durations, sides, n_objects, n_attributes, n_relations, n_frames, n_spans = [], [], 0, 0, 0, 0, 0
        for example in reader:
            r = example.record
            durations.append(r.video.duration)
            fps[f"{r.video.fps:g}"] += 1
            sides += [r.video.width, r.video.height]
            n_frames += len(r.video.frame_indices)
            for o in r.objects:
                n_objects += 1
                n_attributes += len(o.attributes)
                names[o.name] += 1
                attrs.update(o.attributes)
            for rel in r.relations:
                n_relations += 1
                n_spans += len(rel.spans)
                predicates[rel.predicate] += 1
                categories[str(rel.category)] += 1
    videos = len(durations)
    mean = lambda total: round(total / videos, 3) if videos else 0.0  # noqa: E731
    return {
        "dir": str(shard_dir),
        "format": manifest["format"],
        "image_format": manifest["image_format"],
        "split": manifest["split"],
        "shards": len(manifest["shards"]),
        "checksums_ok": checksums_ok,
        "videos": videos,
        "objects": n_objects,
        "attributes": n_attributes,
        "relations": n_relations,
        "relation_spans": n_spans,
        "frames": n_frames,
        "objects_per_video": mean(n_objects),
        "relations_per_video": mean(n_relations),
        "mean_duration_s": mean(sum(durations)),
        "min_duration_s": min(durations, default=0.0),
        "max_duration_s": max(durations, default=0.0),
        "fps": _histogram(fps),
        "frame_side_px": {"min": min(sides, default=0), "max": max(sides, default=0)},
        "object_names": _histogram(names),
        "attribute_values": _histogram(attrs),
        "predicates": _histogram(predicates),
        "categories": _histogram(categories),
    }


def render_video(shard_dir: str, video_id: str, out: str) -> dict:
    from data_gen.render import render_scene_graph  # matplotlib only when drawing

    with ShardReader(shard_dir) as reader:
        ids = reader.ids()
        if video_id not in ids:
            raise KeyError(f"video id {video_id!r} is not in {shard_dir} ({len(ids)} videos, e.g. {ids[:3]})")
        example = reader[ids.index(video_id)]
        render_scene_graph(example.record, example.frames, out)
    return {"video_id": video_id, "rendered": str(out), "objects": len(example.record.objects),
            "relations": len(example.record.relations)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_gen.inspect", description=__doc__.split("\n\n")[1])
    parser.add_argument("dir", help="shard directory (holds manifest.json)")
    parser.add_argument("--render", metavar="VIDEO_ID", help="draw this video's scene graph")
    parser.add_argument("--out", metavar="FILE.png", help="where --render writes the picture")
    args = parser.parse_args(argv)
    if args.render and not args.out:
        parser.error("--render needs --out FILE.png")
    try:
        result = render_video(args.dir, args.render, args.out) if args.render else summarize(args.dir)
    except (ShardError, KeyError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

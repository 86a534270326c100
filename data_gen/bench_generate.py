"""Benchmark: frames per second of generation stages 1-2 against plain SAM2 automatic masks.

Ours: stage 1 (automatic masks on every k-th frame, multi-scale grids, largest-first
filter) plus stage 2 (online-offline tracking over every frame), per frame of the clip.
Baseline: SAM2's automatic mask generator with the same settings on every frame,
which is what per-frame segmentation without a tracker costs.
Random weights at the real shapes (no checkpoint can be downloaded here), so the
figures are compute cost, not quality. Random weights pass no quality threshold:
by default the thresholds are 0 (every mask goes through NMS and tracking, an
upper bound on that cost); --released-thresholds keeps 0.75 / 0.85.

    python -m data_gen.bench_generate [--video clip.mp4] [--models t,l] [--image-size 1024] [--frames 64]

Prints one JSON line per measurement, then a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

CONFIGS = {"t": "configs/sam2.1/sam2.1_hiera_t.yaml", "l": "configs/sam2.1/sam2.1_hiera_l.yaml"}


def _sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clip(args) -> "np.ndarray":
    import numpy as np

    from data_gen.pipeline.video import decode_video

    if args.video:
        frames = decode_video(args.video, max_frames=args.frames).frames
    else:  # a toyworld clip (exact shapes moving, entering and leaving)
        from data_gen.toyworld import write_video_file

        with tempfile.TemporaryDirectory() as d:
            write_video_file(0, 1, Path(d) / "clip.mp4", min_duration=max(4, args.frames // 6 + 1),
                             max_duration=max(4, args.frames // 6 + 1), fps_choices=[6], max_side=448)
            frames = decode_video(Path(d) / "clip.mp4", max_frames=args.frames).frames
    while len(frames) < args.frames:  # loop short clips
        frames = np.concatenate([frames, frames[: args.frames - len(frames)]])
    return frames


def measure(model_key: str, frames, args) -> list[dict]:
    import torch

    from data_gen.pipeline import proposals, sam2_backend, tracking
    from data_gen.pipeline.config import load_config

    overrides = [f"sam2.config={CONFIGS[model_key]}", f"sam2.image_size={args.image_size}",
                 f"sam2.device={args.device}", f"proposals.frame_stride={args.stride}"]
    if not args.released_thresholds:
        overrides += ["proposals.pred_iou_thresh=0", "proposals.stability_score_thresh=0"]
    cfg = load_config(args.config, overrides)
    model = sam2_backend.build_model(cfg.sam2)
    generator = sam2_backend.Sam2MaskGenerator(model, cfg.proposals, cfg.sam2.bfloat16)
    propagator = sam2_backend.Sam2Propagator(model, cfg.sam2.bfloat16)
    device = str(next(model.parameters()).device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.processor() or 'x86'}, " \
                                                                          f"{torch.get_num_threads()} threads)"
    n, h, w = frames.shape[:3]
    common = {"model": model_key, "device": name, "image_size": cfg.sam2.image_size, "frame": [w, h],
              "grids": cfg.proposals.point_grids, "released_thresholds": args.released_thresholds}
    generator(frames[0])  # warm-up
    rows = []

    _sync(torch)
    t = time.perf_counter()
    kept = 0
    for i in range(args.baseline_frames):
        kept += len(generator(frames[i % n]))
    _sync(torch)
    base_s = (time.perf_counter() - t) / args.baseline_frames
    rows.append({"what": "baseline: automatic masks on every frame", **common, "s_per_frame": round(base_s, 3),
                 "frames_per_s": round(1 / base_s, 3), "masks_per_frame": kept / args.baseline_frames})

    _sync(torch)
    t = time.perf_counter()
    props = proposals.propose(frames, generator, cfg.proposals.frame_stride, cfg.proposals.max_covered)
    _sync(torch)
    s1 = time.perf_counter() - t
    t = time.perf_counter()
    tracks = tracking.track(propagator, frames, props, cfg.proposals.frame_stride, cfg.tracking, list(range(n)))
    _sync(torch)
    s2 = time.perf_counter() - t
    rows.append({"what": "ours: stage 1 every k-th frame + stage 2 tracking", **common, "frames": n,
                 "stride": cfg.proposals.frame_stride, "objects": len(tracks.ids), "stage1_s": round(s1, 2),
                 "stage2_s": round(s2, 2), "frames_per_s": round(n / (s1 + s2), 3),
                 "speedup_vs_baseline": round(n / (s1 + s2) * base_s, 2),
                 "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.startswith("cuda")
                 else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", default=None, help="a video file (default: a toyworld clip at 6 fps, 448 px)")
    ap.add_argument("--models", default="t,l", help="comma-separated SAM2.1 shapes: t (tiny), l (large)")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=64, help="clip length for stages 1-2")
    ap.add_argument("--baseline-frames", type=int, default=3, help="frames timed for the per-frame baseline")
    ap.add_argument("--stride", type=int, default=20, help="proposal frame stride (released: 20)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--config", default=None)
    ap.add_argument("--released-thresholds", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    frames = clip(args)
    rows = []
    for key in args.models.split(","):
        for row in measure(key.strip(), frames, args):
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'model':<6}{'what':<52}{'frames/s':>10}")
    for r in rows:
        print(f"{r['model']:<6}{r['what']:<52}{r['frames_per_s']:>10.3f}")


if __name__ == "__main__":
    main()

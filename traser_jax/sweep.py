"""Run a sweep: `launch/sweep.sh SWEEP.yaml [key=value ...]`.

A sweep file names a base preset, one key with the values to try, and fixed
overrides. Each value trains a run in runs/<sweep>/<key>=<value>/ (resuming if
it exists), predicts the held-out split and evaluates it; the evaluations are
collected into runs/<sweep>/results.csv, results.md and results.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from traser_jax import config as config_lib

METRICS = ("object_accuracy", "attribute_recall", "relation_recall_tiou0.5", "relation_recall_tiou0.1",
           "triplet_recall_tiou0.5", "triplet_recall_tiou0.1")


def load_sweep(path: str | Path) -> tuple[str, str, list[Any], dict[str, Any]]:
    spec = yaml.safe_load(Path(path).read_text())
    for key in ("base", "sweep"):
        if key not in spec:
            raise config_lib.ConfigError(f"{path}: missing {key!r}")
    if len(spec["sweep"]) != 1:
        raise config_lib.ConfigError(f"{path}: 'sweep' must name one key, got {list(spec['sweep'])}")
    (key, values), = spec["sweep"].items()
    fixed = spec.get("fixed") or {}
    config_lib.load(spec["base"], {key: values[0], **fixed})  # fail now on an unknown key, not after a run
    return spec["base"], key, list(values), fixed


DEMO_VISION = "runs/demo/vision"  # launch/demo.py's pretrained tower (traser_jax.pretrain_vision)


def ensure_inputs(cfg: config_lib.Config) -> None:
    """The demo's toyworld splits, and its pretrained tower when `train.init_from` names it, are made
    by launch/demo.py when missing (the defaults); other data and checkpoints must exist."""
    demo = config_lib.load("demo")
    paths = (Path(cfg.data.train_dir), Path(cfg.data.eval_dir))
    data_missing = not all(p.exists() for p in paths)
    if data_missing and (cfg.data.train_dir, cfg.data.eval_dir) != (demo.data.train_dir, demo.data.eval_dir):
        missing = ", ".join(str(p) for p in paths if not p.exists())
        raise config_lib.ConfigError(f"no data at {missing}: set data.train_dir / data.eval_dir to shard "
                                     "directories (or leave them at the demo's toyworld defaults)")
    init = cfg.train.init_from
    tower_missing = bool(init) and not Path(init).exists()
    if tower_missing and Path(init) != Path(DEMO_VISION):
        raise config_lib.ConfigError(f"no checkpoint at train.init_from={init} (or set it to {DEMO_VISION}, "
                                     "the demo's pretrained tower, made when missing)")
    demo_py = str(Path(__file__).parents[1] / "launch" / "demo.py")
    if tower_missing:  # the data first, as the demo makes them
        subprocess.run([sys.executable, demo_py, "--vision-only"], check=True)
    elif data_missing:
        subprocess.run([sys.executable, demo_py, "--data-only"], check=True)


def run_one(base: str, overrides: list[str], run_dir: Path, eval_dir: str) -> dict[str, float]:
    py = sys.executable
    subprocess.run([py, "-m", "traser_jax.train", base, *overrides, f"train.run_dir={run_dir}"], check=True)
    pred = run_dir / "predictions.jsonl"
    subprocess.run([py, "-m", "traser_jax.infer", "--checkpoint", str(run_dir), "--data", eval_dir,
                    "--out", str(pred)], check=True)
    out = run_dir / "eval.json"
    subprocess.run([py, "-m", "traser_jax.evaluate", "--gt", eval_dir, "--pred", str(pred), "--out", str(out)],
                   check=True)
    return json.loads(out.read_text())


def write_results(rows: list[dict[str, Any]], key: str, out_dir: Path) -> None:
    cols = [key, *METRICS]
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([str(r[key])] + [f"{100 * r[m]:.1f}" for m in METRICS]) + " |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n\n(metrics in %)\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [float(r[key]) for r in rows]
    for m in METRICS:
        ax.plot(xs, [100 * r[m] for r in rows], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(r[key]) for r in rows])
    ax.set_xlabel(key)
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/sweep.sh", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="a sweep YAML (configs/sweeps/...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides shared by every run")
    parser.add_argument("--out", default=None, help="the sweep's directory (default runs/<sweep file stem>)")
    args = parser.parse_args(argv)
    try:
        base, key, values, fixed = load_sweep(args.sweep)
        shared = [f"{k}={v}" for k, v in fixed.items()] + list(args.overrides)
        cfg = config_lib.load(base, shared)
        ensure_inputs(cfg)
    except config_lib.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path("runs") / Path(args.sweep).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for value in values:
        run_dir = out_dir / f"{key}={value}"
        metrics = run_one(base, [*shared, f"{key}={value}"], run_dir, cfg.data.eval_dir)
        rows.append({key: value, **metrics})
        print(json.dumps({key: value, **{m: metrics[m] for m in METRICS}}))
    write_results(rows, key, out_dir)
    print((out_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the main job on the embedded default, end to end on CPU.

1. generate toyworld shards (train and held-out eval videos) and print their summary;
2. start from the demo's pretrained vision tower (configs/demo_tower.npz: the stand-in for the
   pretrained tower the published model starts from; `make demo-tower` trains it again with
   `traser_jax.pretrain_vision`, on crops of the training objects and the toyworld object catalog, then
   on each object's attention windows in the frames of more toyworld videos: about 1 h 25 min on 2
   cores) and freeze it;
3. pretrain the object resampler on the tower's tokens of each training object
   (`traser_jax.pretrain_objects`), so that the decoder finds each object's name in its latents;
4. train the `demo` config (launch/train.sh's entry point) in two stages from there: the
   `attributes` task alone until the decoder reads the video, then mostly scene graphs from
   those weights (README, "What the demo learns");
5. predict the held-out videos with constrained decoding;
6. evaluate against their ground truth, next to the most-frequent-relation baseline;
7. write runs/demo/metrics.json, loss.png and one prediction rendered next to its
   ground truth (prediction.png).

Every step resumes: rerunning skips generated shards and finished training steps.
`python launch/demo.py --data-only` stops after step 1, `--vision-only` after step 2 (launch/sweep.sh
uses them); `--train-tower` generates the data, trains the tower and writes configs/demo_tower.npz.
The model is runs/demo/scene_graph.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path("runs/demo")
DATA = RUN / "data"
# Small scenes keep the answers short enough to learn on 2 CPU cores in minutes.
KNOBS = ["min_objects=2", "max_objects=4", "max_duration=8", "max_side=280"]
SPLITS = (("train", 512, 0), ("eval", 16, 1))
# The tower (`--train-tower`): pretrained on crops of the training split's objects and 32,000 of the toyworld
# object catalog's, 2,500 steps; then on each object's attention windows in the frames of 2,048 more toyworld
# videos (seed 5), its tokens centered on them.
TOWER = Path(__file__).resolve().parents[1] / "configs" / "demo_tower.npz"
TOWER_SPLIT = ("tower", 2048, 5)
TOWER_CROPS = ["--steps", "2500", "--jitter", "0.125", "--catalog", "32000", *(a for k in KNOBS for a in ("--knob", k))]
TOWER_WINDOWS = ["--windows", "--steps", "1500", "--batch", "32", "--lr", "3e-4", "--center"]
VISION, OBJECTS, STAGE1, MODEL = RUN / "vision", RUN / "objects", RUN / "attributes", RUN / "scene_graph"
# Stage 1 answers objects with attributes only: short sequences (one 320-token bucket; the training
# split's longest is 287) whose loss is mostly grounding. Stage 2 starts from its weights and tokenizer
# and asks mostly for scene graphs: sequences of 243 tokens at the median and 560 at most; a batch of 8
# pads to its longest, which fits 448 tokens in about 3 batches of 4 (a second compilation, and a
# step about a quarter shorter than at one 640 bucket).
# Both keep the pretrained tower frozen with its merger, as the published recipe freezes its tower: the
# tower's output tokens are computed once per video and cached (data.cache_vision_tokens).
FROZEN_TOWER = ["optim.lr_vision=0", "optim.lr_merger=0", "data.cache_vision_tokens=true"]
STAGES = (
    (STAGE1, ["data.task_mix={attributes: 1.0}", "optim.num_steps=400", "tokens.bucket_length=[320]",
              f"train.init_from={OBJECTS}", *FROZEN_TOWER]),
    (MODEL, ["data.task_mix={scene_graph: 0.7, attributes: 0.3}", "optim.num_steps=250",
             "tokens.bucket_length=[448, 576]", f"train.init_from={STAGE1}",
             f"data.tokenizer={STAGE1 / 'tokenizer.json'}", *FROZEN_TOWER]),
)


def sh(*args: str) -> str:
    return subprocess.run([sys.executable, *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def generate(splits=SPLITS) -> None:
    for split, n, seed in splits:
        knobs = [a for k in KNOBS for a in ("--knob", k)]
        sh("-m", "data_gen.toyworld", "--num-videos", str(n), "--seed", str(seed), "--out", str(DATA / split),
           *knobs)
    summary = json.loads(sh("-m", "data_gen.inspect", str(DATA / "train")))
    print(json.dumps(summary, indent=1))


def vision_tower() -> None:
    """The init checkpoint with the committed tower (and random parameters for the rest)."""
    from traser_jax.pretrain_vision import REPORT_NAME

    if (VISION / REPORT_NAME).exists():  # finished on an earlier run
        return
    out = sh("-m", "traser_jax.pretrain_vision", "demo", "--from-tower", str(TOWER), "--out", str(VISION))
    print(f"vision tower: {out.strip()}")


def train_tower() -> None:
    """Pretrain the tower (TOWER_CROPS, then TOWER_WINDOWS) and write it to configs/demo_tower.npz (about
    1 h 25 min on 2 cores)."""
    import shutil

    from traser_jax.pretrain_vision import TOWER_NAME

    generate((TOWER_SPLIT,))
    crops, windows = RUN / "tower_crops", RUN / "tower"
    out = sh("-m", "traser_jax.pretrain_vision", "demo", "--data", str(DATA / "train"), "--eval-data",
             str(DATA / "eval"), "--out", str(crops), *TOWER_CROPS)
    print(f"vision tower pretrained on object crops: {out.strip()}")
    out = sh("-m", "traser_jax.pretrain_vision", "demo", "--data", str(DATA / TOWER_SPLIT[0]), "--eval-data",
             str(DATA / "eval"), "--init-tower", str(crops / TOWER_NAME), "--out", str(windows), *TOWER_WINDOWS)
    print(f"then on object windows: {out.strip()}")
    shutil.copy(windows / TOWER_NAME, TOWER)
    shutil.copy((windows / TOWER_NAME).with_suffix(".json"), TOWER.with_suffix(".json"))
    print(f"wrote {TOWER}")


def pretrain_objects() -> None:
    from traser_jax.pretrain_objects import REPORT_NAME

    if (OBJECTS / REPORT_NAME).exists():
        return
    out = sh("-m", "traser_jax.pretrain_objects", "demo", "--init", str(VISION), "--data", str(DATA / "train"),
             "--eval-data", str(DATA / "eval"), "--out", str(OBJECTS))
    print(f"object resampler pretrained on the tower's object tokens: {out.strip()}")


def plot_loss(stages: list[Path], out: Path) -> None:
    """The training loss of the stages one after the other (each stage's metrics.jsonl)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for metrics_jsonl in stages:
        rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
        ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label=metrics_jsonl.parent.name)
        offset += rows[-1]["step"]
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / answer token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("demo: training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def evaluate(pred_path: Path) -> dict:
    from data_gen.record import from_traser_json
    from data_gen.render import render_comparison
    from data_gen.shards import ShardReader
    from traser_jax.evaluate import evaluate as run_eval, load_predictions, most_frequent_relation_baseline

    gt = [ex.record for ex in ShardReader(DATA / "eval")]
    train = [ex.record for ex in ShardReader(DATA / "train")]
    preds = load_predictions(pred_path)
    metrics = run_eval(gt, preds, bootstrap=200)
    baseline = run_eval(gt, most_frequent_relation_baseline(gt, train), bootstrap=0)
    keys = ("object_accuracy", "attribute_recall", "relation_recall_tiou0.5", "relation_recall_tiou0.1",
            "triplet_recall_tiou0.5", "triplet_recall_tiou0.1")
    out = {k: metrics[k] for k in keys}
    # The baseline names every object with the most frequent training name: object accuracy at chance.
    out.update({f"baseline_{k}": baseline[k] for k in keys if k != "attribute_recall"})
    out.update(ci95=metrics.get("ci95"), per_category=metrics.get("per_category"), counts=metrics.get("counts"))

    example = ShardReader(DATA / "eval")[0]
    by_id = {p["video_id"]: p for p in (preds if isinstance(preds, list) else preds.values())}
    pred_record = from_traser_json(by_id[example.video_id], example.record, strict=False)
    render_comparison(example.record, pred_record, example.frames, RUN / "prediction.png",
                      title=f"{example.video_id}: ground truth | prediction")
    return out


def main() -> None:
    generate()
    if "--data-only" in sys.argv[1:]:  # the toyworld splits alone
        return
    if "--train-tower" in sys.argv[1:]:
        train_tower()
        return
    vision_tower()
    if "--vision-only" in sys.argv[1:]:  # and the pretrained tower
        return
    pretrain_objects()
    for run_dir, overrides in STAGES:
        sh("-m", "traser_jax.train", "demo", f"train.run_dir={run_dir}", f"data.train_dir={DATA / 'train'}",
           f"data.eval_dir={DATA / 'eval'}", *overrides)
    pred = RUN / "predictions.jsonl"
    sh("-m", "traser_jax.infer", "--checkpoint", str(MODEL), "--data", str(DATA / "eval"), "--out", str(pred))
    plot_loss([run_dir / "metrics.jsonl" for run_dir, _ in STAGES], RUN / "loss.png")
    metrics = evaluate(pred)
    (RUN / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print("\nheld-out toyworld videos (exact matcher), %:")
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"  {k:38s} {100 * v:6.1f}")
    print(f"\nwrote {RUN / 'metrics.json'}, {RUN / 'loss.png'}, {RUN / 'prediction.png'}")


if __name__ == "__main__":
    main()

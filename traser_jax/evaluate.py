"""Score TRASER scene-graph predictions with the paper's protocol.

    python -m traser_jax.evaluate --gt DIR_OR_JSONL --pred PRED.jsonl [--out FILE.json]
        [--judge exact|offline|llm] [--strict] [--benchmark pvsg|vidor|vipseg|svg2]
        [--bootstrap 1000] [--baseline-train TRAIN_GT]

Ground truth: a shard directory (data_gen.shards), a JSONL file with one
scene graph a line (a record dict with "video", or a TRASER output JSON with
"video_id"; numbers are then the object ids, and a relationship may carry its
category as a fifth element), or, with --benchmark, a benchmark's own
annotation folder (read by data_gen.convert, no frames needed).
Predictions: JSONL, the TRASER output JSON plus "video_id" per line.
The metric definitions are in traser_jax/eval/metrics.py. Nothing here
imports jax.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from traser_jax.eval.metrics import (BENCHMARK_METRICS, METRICS, EvalInputError, evaluate,
                                     most_frequent_relation_baseline)

__all__ = ["evaluate", "most_frequent_relation_baseline", "load_ground_truth", "load_predictions",
           "format_table", "main"]


def _read_jsonl(path: Path, what: str) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{path}:{n}: {what} line is not valid JSON ({err.msg})") from None
            if not isinstance(item, dict):
                raise EvalInputError(f"{path}:{n}: {what} line must be a JSON object, got {type(item).__name__}")
            out.append(item)
    return out


def load_ground_truth(path: str | Path, benchmark: str | None = None) -> list[Any]:
    """Records (shard dir, benchmark annotations) or dicts (JSONL), in file order."""
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").exists():
        from data_gen.shards import ShardReader

        with ShardReader(path) as reader:
            return [example.record for example in reader]
    if path.is_file():
        return _read_jsonl(path, "ground-truth")
    if path.exists() and benchmark is not None:
        from data_gen.convert import iter_records

        return list(iter_records(benchmark, path))
    raise EvalInputError(f"--gt {path}: expected a shard directory (with manifest.json), a JSONL file, or a "
                         f"benchmark annotation folder together with --benchmark")


def load_predictions(path: str | Path) -> list[dict]:
    items = _read_jsonl(Path(path), "prediction")
    for n, item in enumerate(items, 1):
        if "video_id" not in item:
            raise EvalInputError(f"{path}: prediction {n} has no 'video_id'")
    return items


def format_table(result: dict[str, Any]) -> str:
    counts = result["counts"]
    columns = {"object_accuracy": ("objects_correct", "objects"),
               "attribute_recall": ("attributes_recalled", "attributes")}
    lines = [f"{'metric':26s} {'value':>7s}  {'95% CI':17s} {'hits/total':>13s}"]
    for name in METRICS:
        value = result.get(name)
        if name in columns:
            num, den = columns[name]
        else:
            t = name.rsplit("tiou", 1)[1]
            num, den = (f"relations_recalled_tiou{t}" if name.startswith("relation") else
                        f"triplets_recalled_tiou{t}"), "relations"
        ci = result["ci95"].get(name)
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        value_text = f"{value:7.3f}" if value is not None else f"{'-':>7s}"
        lines.append(f"{name:26s} {value_text}  {ci_text:17s} {counts.get(num, 0):>6}/{counts.get(den, 0):<6}")
    if result["per_category"]:
        lines.append("")
        lines.append(f"{'relation category':26s} {'n':>6s} {'R@0.5':>7s} {'R@0.1':>7s} {'T@0.5':>7s} {'T@0.1':>7s}")
        for cat, entry in result["per_category"].items():
            vals = [entry.get(k) for k in ("relation_recall_tiou0.5", "relation_recall_tiou0.1",
                                           "triplet_recall_tiou0.5", "triplet_recall_tiou0.1")]
            lines.append(f"{cat:26s} {entry['relations']:6d} " +
                         " ".join(f"{v:7.3f}" if v is not None else f"{'-':>7s}" for v in vals))
    s = result["settings"]
    lines.append("")
    lines.append(f"videos {counts['videos']} (without prediction: {counts['videos_without_prediction']}), "
                 f"judge {s['judge']} ({'strict' if s['strict'] else 'lenient'}), micro average, "
                 f"CI: bootstrap over videos x{s['bootstrap_samples']}")
    if counts.get("malformed_prediction_entries") or counts.get("unknown_object_numbers"):
        lines.append(f"dropped malformed prediction entries: {counts['malformed_prediction_entries']}, "
                     f"predicted object numbers not in the ground truth: {counts['unknown_object_numbers']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score TRASER scene-graph predictions (the paper's protocol).")
    parser.add_argument("--gt", required=True, help="shard dir, JSONL, or benchmark annotations (with --benchmark)")
    parser.add_argument("--pred", required=True, help="predictions JSONL: TRASER JSON + video_id per line")
    parser.add_argument("--out", help="write the metrics JSON here")
    parser.add_argument("--judge", default="exact", choices=("exact", "offline", "llm"))
    parser.add_argument("--strict", action="store_true", help="accept only identical labels (default: lenient)")
    parser.add_argument("--benchmark", choices=tuple(BENCHMARK_METRICS),
                        help="report only the metrics this benchmark annotates; lets --gt be its annotations")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples for 95%% CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-train", metavar="TRAIN_GT",
                        help="also score the most-frequent-relation baseline built from this ground truth")
    llm = parser.add_argument_group("LLM judge (--judge llm); the key is read from $OPENAI_API_KEY only")
    llm.add_argument("--llm-model", help="default $TRASER_JUDGE_MODEL")
    llm.add_argument("--llm-base-url", help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL)")
    llm.add_argument("--cache-dir", help="label cache (default $TRASER_JUDGE_CACHE or ~/.cache/traser-jax/judge)")
    llm.add_argument("--price-input", type=float, help="USD per million prompt tokens, for the cost report")
    llm.add_argument("--price-output", type=float, help="USD per million completion tokens")
    args = parser.parse_args(argv)

    from traser_jax.eval.judges import JudgeError, make_judge
    from traser_jax.eval.llm import LLMError

    try:
        gt = load_ground_truth(args.gt, args.benchmark)
        predictions = load_predictions(args.pred)
        llm_kwargs = {}
        if args.judge == "llm":
            llm_kwargs = dict(model=args.llm_model, base_url=args.llm_base_url, cache_dir=args.cache_dir,
                              price_input_per_m=args.price_input, price_output_per_m=args.price_output)
        judge = make_judge(args.judge, **llm_kwargs)
        result = evaluate(gt, predictions, judge=judge, strict=args.strict, bootstrap=args.bootstrap,
                          seed=args.seed, benchmark=args.benchmark)
        if args.baseline_train:
            baseline = most_frequent_relation_baseline(gt, load_ground_truth(args.baseline_train, args.benchmark))
            scored = evaluate(gt, baseline, judge=judge, strict=args.strict, bootstrap=0, benchmark=args.benchmark)
            for name in METRICS[2:]:
                result[f"baseline_{name}"] = scored[name]
    except (EvalInputError, JudgeError, LLMError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.baseline_train:
        base = {t: result[f"baseline_relation_recall_tiou{t}"] for t in ("0.5", "0.1")}
        print("most-frequent-relation baseline: relation recall " +
              ", ".join(f"tIoU {t} {v:.3f}" if v is not None else f"tIoU {t} -" for t, v in base.items()))
    if "judge_report" in result:
        print("judge:", json.dumps(result["judge_report"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

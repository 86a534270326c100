"""The object resampler (OTR) pretrained on a frozen tower's selected tokens (the demo's stage 0b).

    python -m traser_jax.pretrain_objects CONFIG --init DIR --data TRAIN_DIR --out DIR [--eval-data DIR]
        [--steps 250] [--batch 128] [--lr 1e-3] [--seed 0] [key=value ...]

TRASER's OTR turns each object's selected vision tokens into its latent block; the decoder must read
the object's name and attributes from that block. Trained from random inside the scene-graph loss,
on 2 CPU cores the decoder reads little of what the tokens carry (README, "What the demo learns",
session 12: with session 9's wider tower and every cell an object touches selected, starting the
demo's stages from the OTR pretrained here raised held-out object accuracy from 20.6% to 41.2% and
attribute recall from 52.9% to 76.3%; with the demo's tower, whose tokens carry a fifth of the
names, it does not help). This stage trains the OTR alone: for every
object of the training shards, the frozen tower of `--init` (`pretrain_vision`'s checkpoint or any
with a tower) runs on its video, `tokens.select_from_record` picks the object's tokens as training
does, and the OTR's latents, averaged, feed linear heads for the object's name (one softmax over the
training names) and its attributes (one sigmoid per attribute seen in training), as
`pretrain_vision`'s heads. The heads are dropped; the output is `--init`'s checkpoint with the
trained OTR, to start training from (`train.init_from=DIR`). Reported: name accuracy and attribute
recall (`pretrain_vision.scores`) on the training objects and, with `--eval-data`, held-out ones.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from traser_jax import config as config_lib
from traser_jax import tokens as tokens_lib
from traser_jax.config import Config
from traser_jax.modules.layers import dtype_of
from traser_jax.modules.resampler import PerceiverResampler
from traser_jax.pretrain_vision import fit_heads, heads, label_rows, score_heads, tower_encoder

REPORT_NAME = "pretrain_objects.json"  # written last: its presence means the stage finished


def object_tokens(shard_dir: str | Path, cfg: Config, vision_params: dict, progress: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, list[str]]]]:
    """Every selected object of the shards as (tokens [objects, N, D] zero-padded to the most any object
    has, mask [objects, N], [(name, attributes)] per object): the frozen tower's output at the indices
    token selection gives it."""
    from tqdm import tqdm

    from data_gen.shards import ShardReader
    from traser_jax.data import video_features

    encode = tower_encoder(cfg)
    per_object, labels = [], []
    reader = ShardReader(shard_dir)
    for example in tqdm(reader, desc=f"object tokens {Path(shard_dir).name}", disable=not progress, file=sys.stderr):
        pixel_values, grid = video_features(example.record, example.frames, cfg)
        video = np.asarray(encode(vision_params, jnp.asarray(pixel_values), tuple(int(g) for g in grid)))
        selection = tokens_lib.select_from_record(example.record, cfg.vision, cfg.tokens)
        by_id = {o.id: o for o in example.record.objects}
        for object_id, index in zip(selection.object_ids, selection.object_tokens):
            if len(index):
                per_object.append(video[index])
                labels.append((by_id[int(object_id)].name, list(by_id[int(object_id)].attributes)))
    if not per_object:
        raise ValueError(f"no selected object in {shard_dir}")
    width = max(len(t) for t in per_object)
    tokens = np.zeros((len(per_object), width, per_object[0].shape[-1]), np.float32)
    mask = np.zeros((len(per_object), width), bool)
    for row, t in enumerate(per_object):
        tokens[row, :len(t)], mask[row, :len(t)] = t, True
    return tokens, mask, labels


class ObjectClassifier(nn.Module):
    """The OTR on one object's tokens -> (name logits, attribute logits) from its latents' mean."""
    cfg: Config
    num_names: int
    num_attributes: int

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array):
        cfg = self.cfg
        otr = PerceiverResampler(cfg.resampler, dtype=dtype_of(cfg.train.compute_dtype),
                                 param_dtype=dtype_of(cfg.train.param_dtype), name="otr_resampler")
        latents = otr(tokens, jnp.where(mask, 0, -1), 1)[:, 0]  # [B, n_lat, D]: one segment per object
        pooled = latents.astype(jnp.float32).mean(1)
        return heads(pooled, self.num_names, self.num_attributes)


def pretrain(cfg: Config, init_dir: str | Path, train_dir: str | Path, out_dir: str | Path, *,
             eval_dir: str | Path | None = None, steps: int = 250, batch: int = 128, lr: float = 1e-3,
             seed: int = 0, progress: bool = True) -> dict:
    """Train `init_dir`'s OTR on the objects of train_dir (module doc); write the checkpoint and its report;
    return the report."""
    from traser_jax.convert import load_checkpoint, save_checkpoint

    if steps < 1 or batch < 1:
        raise ValueError(f"steps {steps} and batch {batch} must be at least 1")
    _, full = load_checkpoint(init_dir)
    if "vision" not in full or "otr_resampler" not in full:
        raise ValueError(f"{init_dir}: a checkpoint with a vision tower and an OTR is needed")
    tokens, mask, train_labels = object_tokens(train_dir, cfg, full["vision"], progress)
    names = sorted({name for name, _ in train_labels})
    attributes = sorted({a for _, attrs in train_labels for a in attrs})
    train_names, train_attributes = label_rows(train_labels, names, attributes)
    held_out = None
    if eval_dir is not None:
        eval_tokens, eval_mask, eval_labels = object_tokens(eval_dir, cfg, full["vision"], progress)
        held_out = (eval_tokens, eval_mask, *label_rows(eval_labels, names, attributes))

    model = ObjectClassifier(cfg, len(names), len(attributes))
    rng = np.random.default_rng(seed)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), tokens[:1], mask[:1])["params"])
    params["otr_resampler"] = full["otr_resampler"]  # the checkpoint's own OTR, trained from where it is

    def apply(p, tokens_, mask_):
        return model.apply({"params": p}, tokens_, mask_)

    params, losses = fit_heads(params, apply, (tokens, mask), train_names, train_attributes, steps=steps,
                               batch=batch, lr=lr, rng=rng, desc="pretrain objects", progress=progress)
    predict = jax.jit(apply)

    def evaluate(p, tokens_, mask_, names_, attributes_) -> dict[str, float]:
        return score_heads(predict, p, (tokens_, mask_), names_, attributes_)

    report = {"steps": steps, "batch": batch, "lr": lr, "train_objects": len(train_names), "names": names,
              "attributes": attributes, "first_loss": losses[0], "final_loss": losses[-1],
              "train": evaluate(params, tokens, mask, train_names, train_attributes)}
    if held_out is not None:
        report.update(eval_objects=len(held_out[2]), eval=evaluate(params, *held_out))

    full = dict(full)
    full["otr_resampler"] = jax.device_get(params["otr_resampler"])
    out_dir = Path(out_dir)
    save_checkpoint(out_dir, cfg, full)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traser_jax.pretrain_objects", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a preset name in configs/ or a YAML path")
    parser.add_argument("--init", required=True, help="checkpoint with the (frozen) tower, e.g. pretrain_vision's")
    parser.add_argument("--data", required=True, help="training shard directory")
    parser.add_argument("--eval-data", default=None, help="held-out shard directory to report on")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=128, help="objects per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    try:
        cfg = config_lib.load(args.config, args.overrides)
        report = pretrain(cfg, args.init, args.data, args.out, eval_dir=args.eval_data, steps=args.steps,
                          batch=args.batch, lr=args.lr, seed=args.seed)
    except (config_lib.ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("train_objects", "final_loss", "train")}
    summary.update({k: report[k] for k in ("eval_objects", "eval") if k in report})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

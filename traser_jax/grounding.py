"""Is a TRASER model reading the video? Three numbers on a batch of held-out videos.

    python -m traser_jax.grounding --checkpoint RUN_DIR --data SHARD_DIR [--videos 8]

- `loss` vs `loss_shuffled_video`: the answer loss with each video's own pixels and with
  the pixels of the next video in the batch (tokens and masks unchanged). Equal losses:
  the decoder ignores the video.
- `latent_spread`: across videos, the std of the first object's OTR latents over their
  RMS. Near 0: the resampler emits one vector whatever it sees (its learned latents
  outgrew the context it reads; the `demo` config's resampler learning rate avoids this).
- `grad_norm`: the answer-loss gradient norm per parameter group (llm, resampler,
  merger, vision). Groups orders of magnitude below `llm` get no learning signal.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from traser_jax import optim
from traser_jax.config import Config
from traser_jax.data import device_keys
from traser_jax.model import Traser, embed_batch
from traser_jax.train import answer_loss, statics_of


def grounding_report(cfg: Config, params: dict, batch: dict[str, np.ndarray]) -> dict:
    """The three numbers (see the module doc) for a collated batch of >= 2 videos with targets."""
    if batch["input_ids"].shape[0] < 2:
        raise ValueError("grounding needs a batch of at least 2 videos (it swaps their pixels)")
    model, statics = Traser(cfg), statics_of(batch)
    arrays = {k: jnp.asarray(batch[k]) for k in device_keys(batch)}

    def loss(params, arrays):
        total, count = answer_loss(model, params, arrays, statics)
        return total / jnp.maximum(count, 1)

    value, grads = jax.jit(jax.value_and_grad(loss))(params, arrays)
    video = "video_tokens" if "video_tokens" in arrays else "pixel_values"
    shuffled = dict(arrays, **{video: jnp.roll(arrays[video], 1, axis=0)})
    sq: dict[str, float] = {}
    for path, g in traverse_util.flatten_dict(grads).items():
        group = optim.group_of(path)
        sq[group] = sq.get(group, 0.0) + float(jnp.sum(jnp.square(g.astype(jnp.float32))))

    embeds = np.asarray(jax.jit(lambda p, a: embed_batch(model, p, a, statics))(params, arrays))
    n = cfg.resampler.num_latents
    first_otr = np.stack([embeds[i][np.flatnonzero(batch["latent_index"][i] >= 0)[:n]]
                          for i in range(len(embeds))])  # [B, n, D]: object 1's OTR latents
    spread = float(first_otr.std(axis=0).mean() / np.sqrt(np.mean(first_otr ** 2)))
    return {"videos": int(len(embeds)), "loss": float(value), "loss_shuffled_video": float(jax.jit(loss)(
        params, shuffled)), "latent_spread": spread, "grad_norm": {k: v ** 0.5 for k, v in sorted(sq.items())}}


def main(argv: Sequence[str] | None = None) -> int:
    from data_gen.shards import ShardReader
    from traser_jax import tokens as tokens_lib
    from traser_jax.data import collate, featurize
    from traser_jax.infer import InferenceError, load_for_inference

    parser = argparse.ArgumentParser(prog="python -m traser_jax.grounding", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training run directory or converted checkpoint")
    parser.add_argument("--data", required=True, help="a shard directory with ground truth")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)
    try:
        cfg, params, tok = load_for_inference(args.checkpoint, tokenizer=args.tokenizer)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reader = ShardReader(args.data)
    token_fn = tokens_lib.as_token_fn(tok)
    batch = collate([featurize(reader[i], cfg, token_fn) for i in range(min(args.videos, len(reader)))], cfg)
    print(json.dumps(grounding_report(cfg, jax.device_get(params), batch), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

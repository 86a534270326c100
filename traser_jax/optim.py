"""The published optimizer recipe, per parameter group.

AdamW, cosine schedule with linear warmup (1% of the steps), weight decay 0.01,
global-norm clipping at 1.0, and one learning rate per group: the language model
2e-5, both resamplers 1e-4, the vision-to-text merger 5e-5. The vision tower
(everything under the vision module but its merger) is frozen when its learning
rate is 0, and so is the merger: a frozen group is split off the trainable tree,
so it has neither gradients nor optimizer state.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from traser_jax.config import ConfigError, OptimConfig

GROUPS = ("vision", "merger", "llm", "resampler")
MU_DTYPES = ("float32", "bfloat16")  # optim.mu_dtype


def group_of(path: tuple[str, ...]) -> str:
    """The parameter group of a flattened parameter path."""
    top = path[0]
    if "resampler" in top:
        return "resampler"
    if top == "vision":
        return "merger" if "merger" in path else "vision"
    return "llm"


FREEZABLE = {"vision": "lr_vision", "merger": "lr_merger"}  # group -> the learning rate whose 0 freezes it


def split_frozen(params: dict, cfg: OptimConfig) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts: frozen holds the FREEZABLE groups whose learning rate is 0."""
    flat = traverse_util.flatten_dict(params)
    frozen = {p: v for p, v in flat.items() if group_of(p) in FREEZABLE and getattr(cfg, FREEZABLE[group_of(p)]) == 0}
    trainable = {p: v for p, v in flat.items() if p not in frozen}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    flat = traverse_util.flatten_dict(trainable)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)


def warmup_steps(cfg: OptimConfig) -> int:
    """ceil(warmup_ratio x num_steps), as the Hugging Face Trainer the recipe was trained with."""
    return math.ceil(cfg.warmup_ratio * cfg.num_steps)


def schedule(peak_lr: float, cfg: OptimConfig) -> optax.Schedule:
    """The learning rate of update `count` (0-based): linear from 0 over the warmup steps, then a
    cosine from peak_lr down to 0 at num_steps (transformers' get_cosine_schedule_with_warmup)."""
    warmup = warmup_steps(cfg)
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(cfg.num_steps, warmup + 1), end_value=0.0)


def make_optimizer(cfg: OptimConfig, trainable: dict) -> optax.GradientTransformation:
    """Clip the global norm over all trainable parameters, then AdamW per group."""
    lrs = {"vision": cfg.lr_vision, "merger": cfg.lr_merger, "llm": cfg.lr_llm, "resampler": cfg.lr_resampler}

    if cfg.mu_dtype not in MU_DTYPES:
        raise ConfigError(f"optim.mu_dtype {cfg.mu_dtype!r}: expected one of {', '.join(MU_DTYPES)}")

    def adamw(lr: float) -> optax.GradientTransformation:
        return optax.adamw(schedule(lr, cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                           mask=_decay_mask, mu_dtype=jnp.dtype(cfg.mu_dtype))

    labels = traverse_util.unflatten_dict(
        {p: group_of(p) for p in traverse_util.flatten_dict(trainable)})
    present = set(traverse_util.flatten_dict(labels).values())
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        # In GROUPS order, not the set's: the traced program (and its compilation-cache key) must not
        # depend on string hashing.
        optax.multi_transform({g: adamw(lrs[g]) for g in GROUPS if g in present}, labels),
    )


NO_DECAY = ("scale", "bias")  # norm scales and biases, as the HF Trainer (layers are stacked: not ndim)


def _decay_mask(tree: Any) -> Any:
    def decays(path, _):
        names = [getattr(k, "key", None) for k in path]
        return not any(n in NO_DECAY for n in names)
    return jax.tree_util.tree_map_with_path(decays, tree)


def learning_rates(cfg: OptimConfig, step: int) -> dict[str, float]:
    """Each trained group's learning rate at update `step` (0-based; for logging)."""
    lrs = {"llm": cfg.lr_llm, "resampler": cfg.lr_resampler, "merger": cfg.lr_merger, "vision": cfg.lr_vision}
    return {g: float(schedule(lr, cfg)(step)) for g, lr in lrs.items() if lr or g not in FREEZABLE}

"""Train TRASER: `python -m traser_jax.train CONFIG [key=value ...]` (launch/train.sh wraps it).

One `jax.jit` of the train step with explicit in/out shardings over a
(data, fsdp, tensor) mesh and the state donated; parameters carry logical axis
names mapped to mesh axes by `cfg.mesh.rules`. The vision tower is frozen when
`optim.lr_vision` is 0 (no gradients, no optimizer state); bf16 compute over
fp32 master weights and optimizer state; gradient accumulation scans over
micro-batches inside the step. orbax saves state and the grain iterator
together, asynchronously, so a killed job resumes on the very next batch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from traser_jax import config as config_lib
from traser_jax import optim, sharding
from traser_jax.config import Config
from traser_jax.model import Traser, abstract_params, init_params
from traser_jax.tokens import IGNORE_INDEX

BATCH_AXES = ("data", "fsdp")


class NonFiniteLoss(RuntimeError):
    pass


# -- cluster and mesh ---------------------------------------------------------------

def initialize_distributed() -> None:
    """Join the other processes of a multi-host job, if this is one.

    GPU clusters: COORDINATOR_ADDRESS (host:port), NUM_PROCESSES and PROCESS_ID on
    every process. SLURM and TPU pods: jax finds its peers itself."""
    env = os.environ
    if env.get("COORDINATOR_ADDRESS"):
        missing = [k for k in ("NUM_PROCESSES", "PROCESS_ID") if k not in env]
        if missing:
            raise RuntimeError(f"COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        jax.distributed.initialize(coordinator_address=env["COORDINATOR_ADDRESS"],
                                   num_processes=int(env["NUM_PROCESSES"]), process_id=int(env["PROCESS_ID"]))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise config_lib.ConfigError(f"mesh: only one axis may be -1, got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if any(v == 0 or v < -1 for v in sizes.values()) or len(devices) % fixed:
        raise config_lib.ConfigError(f"mesh {sizes} does not fit {len(devices)} devices")
    if fill:
        sizes[fill[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise config_lib.ConfigError(f"mesh {sizes} uses {math.prod(sizes.values())} devices, there are "
                                     f"{len(devices)}")
    types = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=types, devices=devices)


# -- the step -------------------------------------------------------------------------

def statics_of(batch: dict[str, np.ndarray]) -> tuple[tuple[int, int, int], int, int]:
    """The static shape a batch compiles for: (vision grid, object slots K, window slots W)."""
    grid = tuple(int(v) for v in np.asarray(batch["grid_thw"]).reshape(-1, 3)[0])
    return grid, int(batch["object_ids"].shape[-1]), int(batch["window_object"].shape[-1])


def forward(model: Traser, params: dict, batch: dict[str, jax.Array], statics) -> jax.Array:
    """Logits [B, L, vocab]: per video the vision tower and both resamplers (vmapped), then the decoder."""
    grid, k, w = statics

    def embed_one(pixel_values, sel_token, otr_segment, twr_segment, input_ids, latent_index):
        return model.apply({"params": params}, pixel_values, (grid,), sel_token, otr_segment, twr_segment,
                           input_ids[None], latent_index[None], k, w, method=Traser.embed_inputs)[0]

    # Inside the vmap a video's own batch axis is 1: the vmapped axis carries the batch sharding.
    rules = [(name, None if name == sharding.ACT_BATCH else axes) for name, axes in nn.get_logical_axis_rules()]
    with nn.logical_axis_rules(rules):
        embeds = jax.vmap(embed_one, spmd_axis_name=BATCH_AXES)(
            batch["pixel_values"], batch["sel_token"], batch["otr_segment"], batch["twr_segment"],
            batch["input_ids"], batch["latent_index"])
    logits, _ = model.apply({"params": params}, embeds, batch["positions"], batch["attention_mask"],
                            method=Traser.decode)
    return logits


def token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed next-token cross-entropy over answer tokens, their count). labels align with inputs."""
    targets = labels[:, 1:]
    logits = logits[:, :-1].astype(jnp.float32)
    mask = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)


def make_train_step(model: Traser, tx: optax.GradientTransformation, accum: int):
    """state, batch -> (state, metrics); batch arrays lead with the per-step batch, split into `accum`."""

    def step(state, batch, statics):
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def micro_loss(trainable, mb):
            params = optim.merge(trainable, state["frozen"])
            return token_loss(forward(model, params, mb, statics), mb["labels"])

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(carry, mb):
            grads, loss_sum, count = carry
            (loss, n), g = grad_fn(state["params"], mb)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0), micro)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads), "tokens": count}

    return step


class Trainer:
    """Holds the model, mesh, shardings and the one jitted step."""

    def __init__(self, cfg: Config, mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh or make_mesh(cfg.mesh)
        self.rules = sharding.rules_from_config(cfg.mesh.rules)
        self.model = Traser(cfg)
        # Shardings from the logical axis names: optax maps through Flax's metadata boxes,
        # so the optimizer state of boxed parameters carries their names too.
        trainable, frozen = optim.split_frozen(abstract_params(cfg, boxed=True), cfg.optim)
        self.tx = optim.make_optimizer(cfg.optim, trainable)
        specs = nn.get_partition_spec({"step": jax.ShapeDtypeStruct((), jnp.int32), "params": trainable,
                                       "frozen": frozen, "opt_state": jax.eval_shape(self.tx.init, trainable)})
        self.state_shardings = nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)
        self.replicated = NamedSharding(self.mesh, P())
        self._step = jax.jit(make_train_step(self.model, self.tx, cfg.data.grad_accum_steps),
                             in_shardings=(self.state_shardings, None), out_shardings=(self.state_shardings,
                                                                                       self.replicated),
                             static_argnums=2, donate_argnums=0)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, P(BATCH_AXES, *([None] * (ndim - 1))))

    def init_state(self, seed: int, params: dict | None = None) -> dict:
        """Fresh state (random or given parameters), laid out by the state shardings."""
        # Outside the rules context: Flax's boxed init of reshaped kernels trips over activation
        # rules; the out_shardings lay the state out anyway.
        def init(rng, given):
            full = given if given is not None else init_params(self.cfg, rng)
            trainable, frozen = optim.split_frozen(full, self.cfg.optim)
            return {"step": jnp.zeros((), jnp.int32), "params": trainable, "frozen": frozen,
                    "opt_state": self.tx.init(trainable)}
        return jax.jit(init, out_shardings=self.state_shardings)(jax.random.key(seed), params)

    def abstract_state(self) -> dict:
        shapes = jax.eval_shape(lambda: self.init_state(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def context(self):
        return _Context(self.mesh, self.rules)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host-local numpy batch -> global arrays sharded over (data, fsdp)."""
        arrays = {k: v for k, v in batch.items() if k != "grid_thw"}
        return {k: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(v)), np.asarray(v))
                for k, v in arrays.items()}

    def step(self, state: dict, batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
        statics = statics_of(batch)
        with self.context():
            return self._step(state, self.put_batch(batch), statics)


class _Context:
    """The mesh and logical rules active while tracing (for activation constraints)."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules

    def __enter__(self):
        self._mesh_ctx = jax.set_mesh(self.mesh)
        self._mesh_ctx.__enter__()
        self._rules_ctx = nn.logical_axis_rules(self.rules)
        self._rules_ctx.__enter__()

    def __exit__(self, *exc):
        self._rules_ctx.__exit__(*exc)
        self._mesh_ctx.__exit__(*exc)


# -- the loop -------------------------------------------------------------------------

def checkpoint_manager(cfg: Config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_checkpoints,
                                           enable_async_checkpointing=cfg.train.async_checkpointing)
    return ocp.CheckpointManager(Path(cfg.train.run_dir).resolve() / "checkpoints", options=options,
                                 item_names=("state", "data"))


def run(cfg: Config, *, progress: bool = True) -> list[dict[str, float]]:
    """Train for cfg.optim.num_steps (resuming from the run's last checkpoint); returns per-step metrics."""
    import grain

    from traser_jax import data as data_lib

    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg)
    tokenizer = data_lib.run_tokenizer(cfg)
    dataset = data_lib.train_dataset(cfg, tokenizer)
    iterator = iter(dataset)
    mngr = checkpoint_manager(cfg)
    if mngr.latest_step() is not None:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(trainer.abstract_state()),
            data=grain.checkpoint.CheckpointRestore(iterator)))
        state = restored["state"]
        print(f"resumed from step {int(state['step'])} ({mngr.directory})", file=sys.stderr)
    else:
        init = load_init_params(cfg)
        state = trainer.init_state(cfg.train.seed, init)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    start = int(state["step"])
    log = MetricsLog(run_dir, enabled=jax.process_index() == 0)
    history = []
    bar = _progress(start, cfg.optim.num_steps, progress and jax.process_index() == 0)
    last = time.perf_counter()
    for step in range(start, cfg.optim.num_steps):
        batch = next(iterator)
        state, metrics = trainer.step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            mngr.wait_until_finished()
            raise NonFiniteLoss(f"loss is {metrics['loss']} at step {step + 1}; stopping. The last good "
                                f"checkpoint (step {mngr.latest_step()}) is kept in {mngr.directory}")
        now = time.perf_counter()
        metrics.update(step=step + 1, step_time=now - last, tokens_per_s=metrics["tokens"] / (now - last),
                       **{f"lr_{k}": v for k, v in optim.learning_rates(cfg.optim, step).items()})
        last = now
        history.append(metrics)
        log.write(metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", step_s=f"{metrics['step_time']:.2f}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
        if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.optim.num_steps:
            mngr.save(step + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=grain.checkpoint.CheckpointSave(iterator)))
    mngr.wait_until_finished()
    if bar is not None:
        bar.close()
    log.close()
    return history


def load_init_params(cfg: Config) -> dict | None:
    if not cfg.train.init_from:
        return None
    from traser_jax.convert import load_checkpoint
    _, params = load_checkpoint(cfg.train.init_from)
    return params


class MetricsLog:
    """metrics.jsonl (one line per step) and TensorBoard event files in the run directory."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if k != "step":
                self.tb.add_scalar(f"train/{k}", v, int(metrics["step"]))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/train.sh", description="Train TRASER.")
    parser.add_argument("config", help="a preset name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    initialize_distributed()
    try:
        run(cfg)
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

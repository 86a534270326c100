"""Train TRASER: `python -m traser_jax.train CONFIG [key=value ...]` (launch/train.sh wraps it).

One `jax.jit` of the train step with explicit in/out shardings over a
(data, fsdp, tensor) mesh and the state donated; parameters carry logical axis
names mapped to mesh axes by `cfg.mesh.rules`. The vision tower is frozen when
`optim.lr_vision` is 0 (no gradients, no optimizer state); bf16 compute over
fp32 master weights and optimizer state; gradient accumulation scans over
micro-batches inside the step. orbax saves state and the grain iterator
together, asynchronously, so a killed job resumes on the very next batch.
A NaN or inf loss (or gradient norm) stops the run naming the step; that
step's state is not saved. Each step logs to metrics.jsonl (with a
fingerprint of its batch) and TensorBoard, and shows on a progress bar.

Restarts skip compilation with jax's persistent cache: set
JAX_COMPILATION_CACHE_DIR (e.g. to a directory next to the runs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from traser_jax import config as config_lib
from traser_jax import optim, sharding
from traser_jax.config import Config
from traser_jax.data import device_keys
from traser_jax.model import Traser, abstract_params, embed_batch, init_params, shape_mismatch
from traser_jax.modules.layers import dtype_of
from traser_jax.tokens import IGNORE_INDEX


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


def final_hidden(model: Traser, params: dict, batch: dict[str, jax.Array], statics) -> jax.Array:
    """The decoder's final hidden states [B, L, D]: per video the vision tower and both resamplers, then
    the decoder (the logits are the loss's to compute: `sequence_loss`)."""
    embeds = embed_batch(model, params, batch, statics)
    hidden, _ = model.apply({"params": params}, embeds, batch["positions"], batch["attention_mask"],
                            return_hidden=True, method=Traser.decode)
    return hidden


def token_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy of `targets` [..., L] under `logits` [..., L, vocab] where the target is not
    IGNORE_INDEX, their count); float32 log-sum-exp."""
    logits = logits.astype(jnp.float32)
    mask = targets != IGNORE_INDEX
    picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)


def sequence_loss(hidden: jax.Array, labels: jax.Array, logits_fn, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(summed next-token loss over answer tokens, their count) from final hidden states [B, L, D] and
    labels [B, L] aligned with the inputs; `logits_fn` maps hidden states to logits.

    chunk > 0 computes the logits `chunk` positions at a time in a scan and recomputes each chunk's in
    the backward (jax.checkpoint): the float32 [L, vocab] logits never exist whole, only [chunk, vocab]
    (at TRASER's 151,936 words, 2.5 GB per 4096 positions)."""
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    length = hidden.shape[1]
    if chunk <= 0 or chunk >= length:
        return token_loss(logits_fn(hidden), targets)
    pad = -length % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    batch, width = hidden.shape[0], hidden.shape[-1]
    hidden_chunks = hidden.reshape(batch, -1, chunk, width).swapaxes(0, 1)  # [chunks, B, chunk, D]
    target_chunks = targets.reshape(batch, -1, chunk).swapaxes(0, 1)
    chunk_loss = jax.checkpoint(lambda h, t: token_loss(logits_fn(h), t)[0])

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden_chunks, target_chunks))
    return total, jnp.sum(targets != IGNORE_INDEX)


def answer_loss(model: Traser, params: dict, batch: dict[str, jax.Array], statics) -> tuple[jax.Array, jax.Array]:
    """(summed loss over a batch's answer tokens, their count), the loss in chunks of
    `train.loss_chunk` positions."""
    hidden = final_hidden(model, params, batch, statics)
    logits_fn = lambda h: model.apply({"params": params}, h, method=Traser.logits)  # noqa: E731
    return sequence_loss(hidden, batch["labels"], logits_fn, model.cfg.train.loss_chunk)


def micro_batches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """[B, ...] -> [accum, B / accum, ...] with micro-batch m = rows m, m + accum, m + 2 accum, ...

    Strided, not contiguous: the batch is laid out in contiguous blocks over the (data, fsdp)
    devices, so every device holds its share of every micro-batch and none idles."""
    def split(x):
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def layer_stack_paths(cfg: Config) -> frozenset[tuple[str, ...]]:
    """Flattened paths of the parameters on the scanned `layers` axis (the stacks nn.scan loops over)."""
    flat = traverse_util.flatten_dict(abstract_params(cfg, boxed=True))
    return frozenset(path for path, leaf in flat.items()
                     if isinstance(leaf, nn.Partitioned) and leaf.names and leaf.names[0] == sharding.LAYERS)


def cast_layer_stacks(cfg: Config):
    """`train.weight_cast` as a function on parameter trees. per_step casts the scanned layer stacks to
    compute_dtype (every module casts its weights to compute_dtype before use, so that cast becomes a
    no-op inside the layer loops and their remat recomputes); per_layer returns the tree as it is."""
    if cfg.train.weight_cast == "per_layer":
        return lambda tree: tree
    paths, dtype = layer_stack_paths(cfg), dtype_of(cfg.train.compute_dtype)

    def cast(tree: dict) -> dict:
        flat = traverse_util.flatten_dict(tree)
        return traverse_util.unflatten_dict({p: v.astype(dtype) if p in paths else v for p, v in flat.items()})
    return cast


def make_grad_fn(model: Traser, accum: int):
    """(trainable, frozen, batch, statics) -> (mean loss over answer tokens, its gradient, token count).

    The sums over `accum` micro-batches (a scan) are divided by the batch's answer-token count, so the
    result does not depend on `accum`. With train.weight_cast=per_step the layer stacks are cast once,
    before that scan, and their gradients come back in compute_dtype: each is converted as it is added
    to the float32 sums, the convert a per-layer cast's transpose does inside the loop."""
    cast = cast_layer_stacks(model.cfg)

    def grad_fn(trainable, frozen, batch, statics):
        frozen = cast(frozen)

        def micro_loss(params, mb):
            return answer_loss(model, optim.merge(params, frozen), mb, statics)

        value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)
        return mean_over_micro_batches(value_and_grad, cast(trainable), trainable, micro_batches(batch, accum))

    return grad_fn


def mean_over_micro_batches(value_and_grad, params, like: dict, micro: dict):
    """(mean loss, its gradient, token count) from `value_and_grad(params, mb) -> ((loss sum, count), grads)`
    summed over the micro-batches on `micro`'s leading axis (a scan), gradients summed in `like`'s dtypes
    (the float32 parameters) and divided by the total count once at the end."""
    def body(carry, mb):
        grads, loss_sum, count = carry
        (loss, n), g = value_and_grad(params, mb)
        return (jax.tree.map(lambda total, x: total + x.astype(total.dtype), grads, g), loss_sum + loss,
                count + n), None

    init = (jax.tree.map(jnp.zeros_like, like), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grads, loss_sum, count), _ = jax.lax.scan(body, init, micro)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    return loss_sum / denom, jax.tree.map(lambda g: g / denom, grads), count


def make_train_step(model: Traser, tx: optax.GradientTransformation, accum: int):
    """state, batch -> (state, metrics); batch arrays lead with the per-step batch, split into `accum`."""
    grad_fn = make_grad_fn(model, accum)

    def step(state, batch, statics):
        loss, grads, count = grad_fn(state["params"], state["frozen"], batch, statics)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}

    return step


def memory_plan(compiled) -> dict[str, int]:
    """A compiled function's memory plan in bytes per device: arguments, outputs, the outputs that reuse
    donated arguments (alias), temporaries, and peak = arguments + outputs - alias + temporaries."""
    plan = compiled.memory_analysis()
    out = {k: int(getattr(plan, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    return dict(out, peak=out["argument"] + out["output"] - out["alias"] + out["temp"])


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
        accum = cfg.data.grad_accum_steps
        self._step = jax.jit(make_train_step(self.model, self.tx, accum),
                             in_shardings=(self.state_shardings, None), out_shardings=(self.state_shardings,
                                                                                       self.replicated),
                             static_argnums=2, donate_argnums=0)
        grad_fn = make_grad_fn(self.model, accum)
        self._loss_and_grads = jax.jit(
            lambda state, batch, statics: grad_fn(state["params"], state["frozen"], batch, statics)[:2],
            in_shardings=(self.state_shardings, None),
            out_shardings=(self.replicated, self.state_shardings["params"]), static_argnums=2)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return sharding.batch_sharding(self.mesh, ndim)

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
        return sharding.activate(self.mesh, self.rules)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host-local numpy batch -> global arrays sharded over (data, fsdp)."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(batch[k])),
                                                          np.asarray(batch[k])) for k in device_keys(batch)}

    def step(self, state: dict, batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """One optimizer step; `state` is donated (use the returned one)."""
        statics = statics_of(batch)
        with self.context():
            return self._step(state, self.put_batch(batch), statics)

    def lowered_step(self, batch: dict[str, np.ndarray]) -> jax.stages.Lowered:
        """The step lowered for this batch's shapes from the abstract state: nothing is allocated."""
        arrays = {k: jax.ShapeDtypeStruct(np.shape(batch[k]), np.asarray(batch[k]).dtype,
                                          sharding=self.batch_sharding(np.ndim(batch[k])))
                  for k in device_keys(batch)}
        with self.context():
            return self._step.lower(self.abstract_state(), arrays, statics_of(batch))

    def memory_plan(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        """XLA's plan for the compiled step at this batch's shapes, bytes per device: arguments (state
        and batch), outputs, the outputs that reuse donated arguments (alias), temporaries, and
        peak = arguments + outputs - alias + temporaries. Compiles from the abstract state, so it says
        whether a config fits a device before one is at hand."""
        with self.context():
            return memory_plan(self.lowered_step(batch).compile())

    def video_encoder(self, state: dict):
        """(pixel_values, grid_thw) of one video -> its tower's output tokens (numpy), with the state's
        vision parameters: what data.cache_vision_tokens feeds in their place. Compiles once per grid."""
        vision = optim.merge(state["params"], state["frozen"])["vision"]
        encode = jax.jit(lambda p, x, grid: self.model.apply({"params": {"vision": p}}, x, (grid,),
                                                             method=Traser.encode_video), static_argnums=2)

        def encode_video(pixel_values: np.ndarray, grid_thw) -> np.ndarray:
            with self.context():
                return np.asarray(encode(vision, jnp.asarray(pixel_values), tuple(int(g) for g in grid_thw)))
        return encode_video

    def loss_and_grads(self, state: dict, batch: dict[str, np.ndarray]) -> tuple[jax.Array, dict]:
        """(loss, gradients of the trainable parameters) as `step` computes them, laid out as the
        parameters; nothing is updated or donated (for checks)."""
        statics = statics_of(batch)
        with self.context():
            return self._loss_and_grads(state, self.put_batch(batch), statics)


# -- the loop -------------------------------------------------------------------------

def checkpoint_manager(cfg: Config, *, cleanup_tmp: bool = False) -> ocp.CheckpointManager:
    """The run's checkpoints: items "state" (step, params, frozen, opt_state) and "data" (grain iterator).

    cleanup_tmp: delete saves a killed job left unfinished (only the training job itself should)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_checkpoints,
                                           enable_async_checkpointing=cfg.train.async_checkpointing,
                                           cleanup_tmp_directories=cleanup_tmp)
    return ocp.CheckpointManager(Path(cfg.train.run_dir).resolve() / "checkpoints", options=options,
                                 item_names=("state", "data"))


def batch_crc(batch: dict[str, np.ndarray]) -> int:
    """A fingerprint of a batch's tokens, logged per step: which data a step saw (resume checks)."""
    return zlib.crc32(np.ascontiguousarray(batch["input_ids"]).tobytes())


def run(cfg: Config, *, progress: bool = True) -> list[dict[str, float]]:
    """Train for cfg.optim.num_steps (resuming from the run's last checkpoint); returns this call's
    per-step metrics. Raises NonFiniteLoss (after the pending checkpoint is written) when a step's
    loss or gradient norm is NaN or inf; that step's state is not saved."""
    import grain

    from traser_jax import data as data_lib

    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_lib.check_vision_cache(cfg)
    if cfg.data.cache_vision_tokens and jax.process_count() > 1:  # hosts would encode different video counts
        raise config_lib.ConfigError("data.cache_vision_tokens is for single-process runs (the demo, sweeps)")
    trainer = Trainer(cfg)
    tokenizer = data_lib.run_tokenizer(cfg)
    mngr = checkpoint_manager(cfg, cleanup_tmp=True)
    latest = mngr.latest_step()
    if latest is not None:
        state = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(trainer.abstract_state())))["state"]
        print(f"resumed from step {int(state['step'])} ({mngr.directory})", file=sys.stderr)
    else:
        state = trainer.init_state(cfg.train.seed, load_init_params(cfg))
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    # The state first: a cached tower output (data.cache_vision_tokens) comes from its frozen tower.
    encode = trainer.video_encoder(state) if cfg.data.cache_vision_tokens else None
    iterator = iter(data_lib.train_dataset(cfg, tokenizer, encode_video=encode))
    if latest is not None:
        mngr.restore(latest, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
    start = int(state["step"])
    log = MetricsLog(run_dir, start, enabled=jax.process_index() == 0)
    bar = _progress(start, cfg.optim.num_steps, progress and jax.process_index() == 0)
    history = []
    try:
        last = time.perf_counter()
        for step in range(start, cfg.optim.num_steps):
            batch = next(iterator)
            state, metrics = trainer.step(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                mngr.wait_until_finished()
                kept = mngr.latest_step()
                raise NonFiniteLoss(
                    f"non-finite loss {metrics['loss']} (gradient norm {metrics['grad_norm']}) at step {step + 1}; "
                    f"stopping. " + (f"The last good checkpoint, step {kept}, is kept in {mngr.directory}"
                                     if kept is not None else "No checkpoint was saved before it."))
            now = time.perf_counter()
            metrics.update(step=step + 1, step_time=now - last, tokens_per_s=metrics["tokens"] / (now - last),
                           batch_crc=batch_crc(batch),
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
    finally:
        mngr.close()
        if bar is not None:
            bar.close()
        log.close()
    return history


def load_init_params(cfg: Config) -> dict | None:
    """The parameters `train.init_from` names: a converted checkpoint (`python -m traser_jax.convert`)
    or a training run directory (its latest step; e.g. the first stage of a curriculum). Their shapes
    must be the config's."""
    if not cfg.train.init_from:
        return None
    from traser_jax import infer  # imported here: infer builds on this module

    path = Path(cfg.train.init_from)
    try:
        if infer.checkpoint_kind(path) == "run":
            source = config_lib.load(path / "config.json")
            _, params = infer.restore_run_params(path, source, make_mesh(source.mesh))
        else:
            from traser_jax.convert import load_checkpoint
            _, params = load_checkpoint(path)
    except infer.InferenceError as err:
        raise config_lib.ConfigError(f"train.init_from: {err}") from err
    mismatch = shape_mismatch(abstract_params(cfg, boxed=False), params)
    if mismatch:
        name, shape_got, shape_want = mismatch
        raise config_lib.ConfigError(f"train.init_from {path}: parameter {name} has shape {shape_got}, the "
                                     f"config needs {shape_want}")
    return params


class MetricsLog:
    """metrics.jsonl (one line per step) and TensorBoard event files in the run directory.

    Resuming at `start` drops the lines of later steps that a killed job logged after its last
    checkpoint, so the file reads as one run whose steps the resumed job then logs again."""

    NOT_PLOTTED = ("step", "batch_crc")

    def __init__(self, run_dir: Path, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter
            path = run_dir / "metrics.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            path.write_text("".join(line + "\n" for line in lines if _logged_step(line) <= start))
            self.jsonl = open(path, "a")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if k not in self.NOT_PLOTTED:
                self.tb.add_scalar(f"train/{k}", v, int(metrics["step"]))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line a killed job left half-written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


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

"""Train-step benchmark: step time, tokens/s and MFU of one TRASER config on synthetic inputs.

    python -m traser_jax.bench [--config demo] [--seq 2048] [--frames 16] [--res 224] [--objects 4]
        [--batch 1] [--steps 5] [--warmup 1] [--baseline] [--out FILE.json] [key=value ...]

The batch is what the input pipeline would give (`tokens.arrange` + `data.collate`)
for `--batch` synthetic videos: `--frames` frames of `--res` x `--res` pixels (random
pixels), `--objects` objects each covering `--object-cells` merged-token cells of every
temporal grid (1 s per frame, so `tokens.window_seconds` sets the windows), the
prompt and object blocks, then random answer tokens up to exactly `--seq` language-model
tokens (all carrying loss). Shape buckets are set to these exact sizes, so nothing is
padding. The step is `train.Trainer.step` (one jitted, sharded step over the config's
mesh, state donated), timed after `--warmup` steps; the median over `--steps` is
reported. The frozen vision tower's forward alone is timed too (frames/s). With
`data.cache_vision_tokens=true` (and the tower and merger frozen, as training needs) the step
reads the tower's output tokens computed before timing, as a cached training run's step does,
and the model FLOPs leave the tower out.

Model FLOPs per step (what the model needs, not what the implementation spends):
- decoder, as MaxText's `calculate_tflops_training_per_device`
  (AI-Hypercomputer/maxtext, src/MaxText/maxtext_utils.py): 3 x (fwd + 2 bwd) the matmul
  FLOPs of q/k/v/o projections, the gated MLP and the output projection over all tokens
  (= 6 x matmul weights x tokens), plus causal attention 3 x 4 x seq^2 x heads x head_dim / 2
  per layer (MaxText halves the non-causal count for the causal mask);
- both resamplers (trained: x 3): q/o/MLP over the latents, k/v over the selected tokens
  and the latents, and cross-attention of each segment's latents to its own tokens and
  latents: 4 x heads x head_dim x latents x (selected tokens + segments x latents);
- the vision tower, forward only when frozen (optim.lr_vision = 0; else x 3): 2 x matmul
  weights x patches + window/full attention 4 x width x sum(group length^2) over its
  exact window and frame groups; its merger x 3 when trained.
MFU = model FLOPs / step time / (peak FLOP/s per device x devices). Peak: bf16 dense
by device kind (PEAK_FLOPS); on CPU, measured with a float32 matmul (`cpu_peak_flops`).

`--breakdown` also times the forward alone and forward + backward (forward / backward / optimizer
seconds); `--profile DIR` traces 3 more steps with jax.profiler and lists the heaviest device ops;
`--lm-step` also times the decoder alone, as the PyTorch baseline trains its language model.
`--memory-plan` only compiles the step and reports XLA's memory plan per device
(`Trainer.memory_plan`): whether a config and shape fit a card, without the card.

`--baseline` first runs ../shared/bench/hf_torch_baseline.py (Hugging Face PyTorch
Qwen2.5-VL-3B language model train step and vision tower forward, CUDA only) with the
same sequence length, frames and resolution, before JAX claims the GPU, and reports
the tokens/s ratio.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from traser_jax import config as config_lib
from traser_jax import tokens as tokens_lib
from traser_jax.config import Config
from traser_jax.modules.vision import vision_layout

# bf16 dense peak FLOP/s per device; the first matching substring of jax's device_kind wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),   # SXM / HBM3
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
)
BASELINE_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "bench" / "hf_torch_baseline.py"
IDLE_EVENTS = ("wait for completion", "::Await")  # XLA CPU's client and thread pool waiting on ops
TEXT_ID_OFFSET = 10  # synthetic text ids start past the small tokenizers' special ids


# -- model FLOPs ------------------------------------------------------------------------------

def decoder_flops(cfg: Config, seq: int, batch: int) -> dict[str, int]:
    """Training FLOPs of the decoder (MaxText's count): {'weights', 'attention'}."""
    t = cfg.text
    hd = t.hidden_size // t.num_heads
    e, heads, kv = t.hidden_size, t.num_heads, t.num_kv_heads
    per_layer = 2 * e * (heads + 2 * kv) * hd + 2 * e * heads * hd + 2 * e * t.intermediate_size * 3
    output = 2 * e * t.vocab_size  # the logits projection (tied or not: one matmul)
    weights = 3 * batch * seq * (t.num_layers * per_layer + output)
    attention = 3 * batch * t.num_layers * 2 * seq ** 2 * heads * hd  # 4 s^2 h d, halved for the causal mask
    return {"weights": weights, "attention": attention}


def resampler_flops(cfg: Config, selected: int, segments: int) -> dict[str, int]:
    """Forward FLOPs of one resampler over one video: `selected` context tokens in `segments` segments."""
    r = cfg.resampler
    n, d, heads, kv, hd = r.num_latents, r.hidden_size, r.num_heads, r.num_kv_heads, r.head_dim
    latents = segments * n
    per_layer = (2 * latents * d * heads * hd  # q
                 + 2 * 2 * (selected + latents) * d * kv * hd  # k, v of the tokens and the latents
                 + 2 * latents * heads * hd * d  # o
                 + 2 * latents * d * r.intermediate_size * 3)  # gated MLP
    attention = 4 * heads * hd * n * (selected + latents)  # each segment: n latents x (its tokens + n)
    return {"weights": r.depth * per_layer, "attention": r.depth * attention}


def vision_flops(cfg: Config, grid: tuple[int, int, int]) -> dict[str, int]:
    """Forward FLOPs of the vision tower over one video's patch grid: {'weights', 'attention', 'merger'}."""
    v = cfg.vision
    t, h, w = grid
    patches = t * h * w
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    d = v.hidden_size
    per_layer = 2 * patches * d * 3 * d + 2 * patches * d * d + 2 * patches * d * v.intermediate_size * 3
    layout = vision_layout((grid,), v.spatial_merge_size, v.window_size, v.patch_size)
    window = int(((layout.window_groups >= 0).sum(1).astype(np.int64) ** 2).sum())
    frame = int(((layout.frame_groups >= 0).sum(1).astype(np.int64) ** 2).sum())
    full = sum(1 for i in range(v.depth) if i in v.fullatt_block_indexes)
    attention = 4 * d * (full * frame + (v.depth - full) * window)
    merged, width = patches // v.spatial_merge_size ** 2, d * v.spatial_merge_size ** 2
    merger = 2 * merged * width * width + 2 * merged * width * v.out_hidden_size
    return {"weights": 2 * patches * patch_dim * d + v.depth * per_layer, "attention": attention, "merger": merger}


def model_flops(cfg: Config, *, seq: int, batch: int, grid: tuple[int, int, int], selected: int, objects: int,
                windows: int) -> dict[str, int]:
    """Model FLOPs of one train step of `batch` videos alike, by part, and their 'total' (no tower
    with data.cache_vision_tokens: the step reads its cached output)."""
    train_x = lambda lr: 3 if lr > 0 else 1  # noqa: E731 - fwd only when frozen
    dec = decoder_flops(cfg, seq, batch)
    otr, twr = resampler_flops(cfg, selected, objects), resampler_flops(cfg, selected, windows)
    vis = vision_flops(cfg, grid)
    r_x, v_x, m_x = train_x(cfg.optim.lr_resampler), train_x(cfg.optim.lr_vision), train_x(cfg.optim.lr_merger)
    if cfg.data.cache_vision_tokens:
        v_x = m_x = 0
    out = {
        "decoder_weights": dec["weights"], "decoder_attention": dec["attention"],
        "resampler_weights": batch * r_x * (otr["weights"] + twr["weights"]),
        "resampler_attention": batch * r_x * (otr["attention"] + twr["attention"]),
        "vision_weights": batch * v_x * vis["weights"], "vision_attention": batch * v_x * vis["attention"],
        "vision_merger": batch * m_x * vis["merger"],
    }
    out["total"] = sum(out.values())
    return out


# -- peak FLOP/s ------------------------------------------------------------------------------

def cpu_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """The best float32 matmul rate jax reaches on this host (a measured ceiling, not a datasheet)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops(device: jax.Device) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = device.device_kind
    for key, value in PEAK_FLOPS:
        if key.lower() in kind.lower():
            return value, f"bf16 dense datasheet ({key})"
    if device.platform == "cpu":
        return cpu_peak_flops(), "measured float32 matmul 2048^3"
    return None, f"n/a: no peak known for {kind!r}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: jax.Device) -> str:
    """The processor's model on CPU (its device kind says only "cpu"), else the device kind."""
    return cpu_name() if device.platform == "cpu" else device.device_kind


# -- synthetic batch ---------------------------------------------------------------------------

def synthetic_batch(cfg: Config, *, seq: int, frames: int, res: int, objects: int, object_cells: int,
                    batch: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A collated batch of `batch` synthetic videos (see the module docstring) and its sizes.

    Sets cfg.tokens' buckets to the exact sizes, so the batch carries no padding."""
    from traser_jax.data import Features, collate

    v = cfg.vision
    cell = v.patch_size * v.spatial_merge_size
    if res % cell or res <= 0:
        raise ValueError(f"--res {res} must be a positive multiple of {cell} (patch x merge)")
    if frames < 1 or objects < 1 or batch < 1 or seq < 1:
        raise ValueError(f"--frames {frames}, --objects {objects}, --batch {batch}, --seq {seq} must be >= 1")
    grid_t = -(-frames // v.temporal_patch_size)
    grid = tokens_lib.TokenGrid(frames, grid_t, res // cell, res // cell, v.temporal_patch_size)
    if not 1 <= object_cells <= grid.cells_per_grid:
        raise ValueError(f"--object-cells {object_cells} must be in [1, {grid.cells_per_grid}] (cells of a "
                         f"{res}px frame)")
    vocab = cfg.text.vocab_size
    token_fn = lambda text: [TEXT_ID_OFFSET + b % (vocab - TEXT_ID_OFFSET) for b in text.encode()]  # noqa: E731
    prefix, suffix = (token_fn(t) for t in tokens_lib.chat_texts(cfg.data.prompt))
    rng = np.random.default_rng(seed)
    patch_grid = (grid_t, res // v.patch_size, res // v.patch_size)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    videos = []
    for i in range(batch):
        chosen = [np.sort(np.concatenate([g * grid.cells_per_grid + rng.choice(grid.cells_per_grid, object_cells,
                                                                                replace=False)
                                          for g in range(grid_t)])) for _ in range(objects)]
        selection = tokens_lib.Selection(grid, 1.0, list(range(objects)), chosen)
        prompt = tokens_lib.arrange(selection, token_fn, cfg.tokens, cfg.resampler.num_latents, prefix, suffix)
        if int(prompt.num_objects) < objects:
            raise ValueError(f"tokens.max_tokens / max_objects keep {int(prompt.num_objects)} of --objects {objects}")
        answer = seq - int(prompt.length)
        if answer < 1:
            raise ValueError(f"--seq {seq} is too short: the prompt and {objects} object blocks take "
                             f"{int(prompt.length)} tokens; raise --seq or lower --objects / --frames")
        target = rng.integers(TEXT_ID_OFFSET, vocab, answer).tolist()
        inputs = tokens_lib.arrange(selection, token_fn, cfg.tokens, cfg.resampler.num_latents, prefix, suffix,
                                    target)
        pixels = rng.standard_normal((int(np.prod(patch_grid)), patch_dim), np.float32)
        videos.append(Features(f"synthetic-{i}", pixels, patch_grid, inputs))
    sizes = {"seq": seq, "selected": int(videos[0].inputs.num_selected), "objects": objects,
             "windows": int(videos[0].inputs.num_windows), "grid": patch_grid,
             "answer_tokens": int((videos[0].inputs.labels != tokens_lib.IGNORE_INDEX).sum())}
    config_lib.apply_overrides(cfg, {"tokens.bucket_length": [seq], "tokens.bucket_selected": [sizes["selected"]],
                                     "tokens.bucket_objects": [objects], "tokens.bucket_windows": [sizes["windows"]],
                                     "tokens.bucket_grid_t": [grid_t]})
    return collate(videos, cfg), sizes


# -- timing ------------------------------------------------------------------------------------

def timed(run, steps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `steps` (at least 1) calls of `run`, after `warmup` (at least 1: the first
    compiles) untimed ones; `run` returns the arrays to wait for."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(run())
    times = []
    for _ in range(max(steps, 1)):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return times


def time_train_step(trainer, state, batch, warmup: int, steps: int) -> tuple[list[float], Any, dict, Any]:
    """Seconds of each timed `Trainer.step` (after `warmup` untimed ones), the final state, last metrics,
    and the function that runs one more step (for `profile_runs`; it carries the state on)."""
    held = {"state": state}  # each step donates the state it is given

    def run():
        held["state"], held["metrics"] = trainer.step(held["state"], batch)
        return held["metrics"]

    times = timed(run, steps, warmup)
    return times, held["state"], jax.device_get(held["metrics"]), run


def time_vision_forward(cfg: Config, params: dict, pixel_values: np.ndarray, grid, steps: int) -> float:
    """Median seconds of the vision tower's forward (merger included) over one video."""
    from traser_jax.model import Traser

    model = Traser(cfg)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, (grid,), method=Traser.encode_video))
    x = jnp.asarray(pixel_values)
    return statistics.median(timed(lambda: encode(params, x), steps))


def time_breakdown(trainer, state, batch_np, steps: int) -> dict[str, float]:
    """Median seconds of the step's forward alone (loss of the whole batch) and of forward + backward
    (`Trainer.loss_and_grads`: no update); with the step time they split a step into forward, backward
    and optimizer."""
    from traser_jax import optim
    from traser_jax.train import answer_loss, statics_of

    statics = statics_of(batch_np)
    median_s = lambda run: statistics.median(timed(run, steps))  # noqa: E731

    with trainer.context():
        batch = trainer.put_batch(batch_np)
        loss = jax.jit(lambda p, f, b: answer_loss(trainer.model, optim.merge(p, f), b, statics))
        forward_s = median_s(lambda: loss(state["params"], state["frozen"], batch))
    forward_backward_s = median_s(lambda: trainer.loss_and_grads(state, batch_np))
    return {"forward_s": forward_s, "forward_backward_s": forward_backward_s}


def profile_runs(run, out_dir: Path, steps: int = 3) -> dict[str, Any]:
    """`steps` calls of `run` (returning the arrays to wait for) under jax.profiler, a TensorBoard /
    Perfetto trace in `out_dir`; the trace's summary (`trace_summary`: heaviest events, time per
    kernel kind)."""
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(run())
    traces = sorted(Path(out_dir).glob("plugins/profile/*/perfetto_trace.json.gz"))
    return trace_summary(traces[-1], steps) if traces else {"top": [], "by_kind": {}}


# Kernel kinds by name: cuBLAS / cuDNN kernels and XLA's fusion names (GPU), HLO op names (CPU).
# First match wins: a "gemm_fusion" is a matmul, a "reduce" inside an input fusion is a reduction.
KERNEL_KINDS = (
    ("attention", ("sdpa", "flash", "fmha", "cudnn")),
    ("matmul", ("nvjet", "cutlass", "gemm", "xmma", "dot", "convolution")),
    ("copy", ("memcpy", "memset", "copy")),
    ("dynamic_update_slice", ("dynamic_update_slice", "dynamic-update-slice")),
    ("reduction", ("reduce",)),
    ("xnnpack", ("ynn_",)),  # CPU: XNNPACK's fusions, matmuls with the ops fused around them
    ("elementwise", ("loop_", "input_", "wrapped_", "fusion")),
)


def kernel_kind(name: str) -> str:
    """The kind of a device event (KERNEL_KINDS), 'other' for none."""
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lowered for m in marks)), "other")


def trace_summary(trace_path: Path, steps: int, top: int = 25) -> dict[str, Any]:
    """A Perfetto trace's device time per step, from the self time of each event on the device lanes
    (processes named /device:...; on CPU, XLA's own threads):
    - "top": the `top` events by self time, each with its lane and share of its lane's time;
    - "by_kind": ms per step for each `kernel_kind`, heaviest first, and "total"."""
    import gzip

    trace = json.loads(gzip.open(trace_path).read())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    on_device = any(name.startswith("/device:") for name in processes.values())

    def lane(e) -> str | None:
        process, thread = processes.get(e["pid"], ""), threads.get((e["pid"], e.get("tid")), "")
        if on_device:
            return f"{process} {thread}" if process.startswith("/device:") else None
        return thread if thread.startswith("tf_XLA") else None

    by_lane: dict[str, list[dict]] = {}
    for e in events:
        # Zero-length markers and a thread waiting for its workers are not work.
        work = e.get("ph") == "X" and float(e.get("dur", 0.0)) > 0 and not any(w in e["name"] for w in IDLE_EVENTS)
        name = lane(e) if work else None
        if name is not None:
            by_lane.setdefault(name, []).append(e)
    totals: dict[tuple[str, str], float] = {}
    source: dict[tuple[str, str], str] = {}  # the JAX op path, where the trace carries one (GPU, TPU)
    for name, lane_events in by_lane.items():
        for e, self_us in _self_times(lane_events):
            key = (name, e["name"])
            totals[key] = totals.get(key, 0.0) + self_us
            path = "" if key in source else _op_path(e.get("args") or {})
            if path:
                source[key] = path[:300]
    per_lane: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    for (name, event), us in totals.items():
        per_lane[name] = per_lane.get(name, 0.0) + us
        kind = kernel_kind(event)
        by_kind[kind] = by_kind.get(kind, 0.0) + us
    heaviest = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    ms = lambda us: round(us / 1e3 / steps, 3)  # noqa: E731
    return {"top": [{"lane": name, "event": event, "ms_per_step": ms(us),
                     "share_of_lane": round(us / per_lane[name], 4), "source": source.get((name, event), "")}
                    for (name, event), us in heaviest],
            "by_kind": {**{k: ms(us) for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                        "total": ms(sum(by_kind.values()))}}


def _op_path(args: dict) -> str:
    """The JAX op path of a trace event, where it carries one: "tf_op" on CPU; a GPU trace has only
    "XlaModule:" there and puts the path in "name", on some of a kernel's launches."""
    for key in ("tf_op", "name"):
        if "/" in str(args.get(key) or ""):
            return str(args[key])
    return str(args.get("long_name") or "")


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """Each event of one lane with its self time: its duration less that of the events directly
    inside it (an executor's wrapper keeps only its own overhead, an op loses its end marker).

    Inside means wholly inside. Consecutive GPU kernels can overlap by a microsecond or two in the
    trace's timestamps; such a kernel follows the one before it, it is not nested in it."""
    ordered = sorted(events, key=lambda e: (float(e["ts"]), -float(e["dur"])))
    out, open_ = [], []  # open_: [event, self time] of the enclosing events, innermost last
    for e in ordered:
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        while open_ and not start < float(open_[-1][0]["ts"]) + float(open_[-1][0]["dur"]) >= end:
            out.append(tuple(open_.pop()))
        if open_:
            open_[-1][1] -= float(e["dur"])
        open_.append([e, float(e["dur"])])
    out.extend(tuple(x) for x in open_)
    return out


def lm_step_program(cfg: Config, *, seq: int, batch: int, seed: int = 0, sharding=None):
    """The decoder alone, trained as the PyTorch baseline trains its language model: `batch` x `seq`
    random token ids, next-token loss on every position, the training optimizer over the decoder (its
    `llm` group), the config's dtypes, remat, weight cast, layer loops, attention and gradient
    accumulation (`data.grad_accum_steps` micro-batches of batch / accum videos, as the whole step).

    Returns (step, params, opt_state, batch): step(params, opt_state, batch) -> (params, opt_state, loss),
    to jit with the state donated. With `sharding` (one device's, maybe a GPU compiled for without one),
    params, opt_state and batch are abstract shapes placed there and nothing is allocated."""
    import flax.linen as nn
    import optax

    from traser_jax import optim
    from traser_jax.modules.layers import dtype_of
    from traser_jax.modules.text import TextDecoder
    from traser_jax.train import cast_layer_stacks, mean_over_micro_batches, micro_batches, sequence_loss

    t, accum = cfg.text, cfg.data.grad_accum_steps
    if batch % accum:
        raise ValueError(f"--batch {batch} is not a multiple of data.grad_accum_steps={accum}")
    decoder = TextDecoder(t, dtype=dtype_of(cfg.train.compute_dtype), param_dtype=dtype_of(cfg.train.param_dtype),
                          remat=cfg.train.remat, unroll_layers=cfg.train.unroll_layers,
                          attention_impl=cfg.train.attention_impl)
    ids = jnp.asarray(np.random.default_rng(seed).integers(TEXT_ID_OFFSET, t.vocab_size, (batch, seq)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    tokens = {"ids": ids, "positions": positions, "mask": jnp.ones((batch, seq), jnp.int32)}
    embeds = jnp.zeros((1, seq, t.hidden_size), dtype_of(cfg.train.compute_dtype))
    init = functools.partial(decoder.init, jax.random.key(seed), embeds, positions[:1], tokens["mask"][:1])
    variables = jax.eval_shape(init) if sharding is not None else jax.jit(init)()
    params = {"llm": nn.meta.unbox(variables["params"])}
    tx = optim.make_optimizer(cfg.optim, params)
    opt_state = jax.eval_shape(tx.init, params) if sharding is not None else tx.init(params)

    def summed_loss(p, mb):
        apply = functools.partial(decoder.apply, {"params": p["llm"]})
        hidden = apply(apply(mb["ids"], method=TextDecoder.embed), mb["positions"], mb["mask"], return_hidden=True)[0]
        return sequence_loss(hidden, mb["ids"], functools.partial(apply, method=TextDecoder.logits),
                             cfg.train.loss_chunk)

    cast = cast_layer_stacks(cfg)  # the decoder's stacks sit at the same paths as in the whole model
    value_and_grad = jax.value_and_grad(summed_loss, has_aux=True)

    def step(p, opt_state, b):
        loss, grads, _ = mean_over_micro_batches(value_and_grad, cast(p), p, micro_batches(b, accum))
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    if sharding is not None:
        params, opt_state, tokens = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), (params, opt_state, tokens))
    return step, params, opt_state, tokens


def time_lm_step(cfg: Config, *, seq: int, batch: int, steps: int, warmup: int, peak: float | None,
                 seed: int = 0, profile_dir: Path | None = None) -> dict[str, Any]:
    """`lm_step_program` on the default device: median seconds of `steps` steps after `warmup`,
    tokens/s, and MFU over the decoder's model FLOPs against `peak` FLOP/s; with `profile_dir`, 3 more
    steps traced (`profile_runs`)."""
    from traser_jax.train import memory_plan

    step, params, opt_state, tokens = lm_step_program(cfg, seq=seq, batch=batch, seed=seed)
    held = {"state": (params, opt_state)}  # each step donates the state it is given
    step = jax.jit(step, donate_argnums=(0, 1)).lower(*held["state"], tokens).compile()

    def run():
        new_params, opt_state, held["loss"] = step(*held["state"], tokens)
        held["state"] = (new_params, opt_state)
        return held["loss"]

    step_s = statistics.median(timed(run, steps, warmup))
    flops = sum(decoder_flops(cfg, seq, batch).values())
    report = {"step_s": round(step_s, 5), "tokens_per_s": round(batch * seq / step_s, 1),
              "loss": float(held["loss"]), "model_flops_per_step": _sig(flops),
              "mfu": None if peak is None else round(flops / step_s / peak, 4)}
    # XLA's plan of this step: in one process of several variants, the device's peak would mix them.
    report["planned_peak_gib"] = round(memory_plan(step)["peak"] / 2 ** 30, 2)
    if profile_dir is not None:
        summary = profile_runs(run, profile_dir)
        report["profile_top"], report["profile_by_kind"] = summary["top"], summary["by_kind"]
        report["profile_dir"] = str(profile_dir)
    return report


def run_facts(cfg: Config, *, batch: int, seq: int, num_devices: int,
              device: jax.Device | None = None) -> dict[str, Any]:
    """What every report starts with: the config, the machine (`device`, default the first local one),
    and the settings that change a step's speed."""
    device = device or jax.devices()[0]
    return {"config": cfg.name, "backend": device.platform, "device": device_name(device),
            "num_devices": num_devices, "compute_dtype": cfg.train.compute_dtype,
            "param_dtype": cfg.train.param_dtype, "remat": cfg.train.remat, "weight_cast": cfg.train.weight_cast,
            "unroll_layers": cfg.train.unroll_layers, "attention_impl": cfg.train.attention_impl,
            "loss_chunk": cfg.train.loss_chunk,
            "grad_accum_steps": cfg.data.grad_accum_steps, "mu_dtype": cfg.optim.mu_dtype, "batch": batch,
            "seq": seq}


def lm_step_report(cfg: Config, *, seq: int, batch: int, steps: int, warmup: int, seed: int = 0,
                   profile_dir: Path | None = None) -> dict[str, Any]:
    """The report of `--lm-step-only`: the run's facts and `time_lm_step` (profiled with `profile_dir`),
    no whole step."""
    peak, peak_source = peak_flops(jax.devices()[0])
    return {**run_facts(cfg, batch=batch, seq=seq, num_devices=1),
            "peak_tflops_per_device": None if peak is None else _sig(peak / 1e12), "peak_source": peak_source,
            "lm_step": time_lm_step(cfg, seq=seq, batch=batch, steps=steps, warmup=warmup, peak=peak, seed=seed,
                                    profile_dir=profile_dir)}


def lm_variant(config: str, overrides: Sequence[str], variant: str, batch: int) -> tuple[str, int, Config]:
    """One `--lm-variant` string: (the string, its batch, the config with its overrides after the command's).
    A `batch=N` word sets the videos per step; every other word is a config override."""
    words, n = variant.split(), batch
    for word in [w for w in words if w.startswith("batch=")]:
        words.remove(word)
        n = int(word.split("=", 1)[1])
    return variant, n, config_lib.load(config, [*overrides, *words])


def time_lm_variants(variants: Sequence[tuple[str, int, Config]], *, seq: int, steps: int, warmup: int,
                     seed: int = 0) -> list[dict[str, Any]]:
    """`time_lm_step` for each variant in turn, in this process (one backend start, no other state held).
    A variant that fails (out of memory, say) gets its error and the next one runs; each row is also
    printed to stderr as it comes, so a run cut short keeps the rows it finished."""
    peak, _ = peak_flops(jax.devices()[0])
    rows = []
    for variant, batch, cfg in variants:
        row = {"variant": variant, "batch": batch}
        try:
            row.update(time_lm_step(cfg, seq=seq, batch=batch, steps=steps, warmup=warmup, peak=peak, seed=seed))
        except Exception as err:  # noqa: BLE001 - one variant out of memory must not lose the others
            row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
        print(f"lm variant: {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def run_baseline(script: Path, *, seq: int, frames: int, res: int, steps: int, remat: bool,
                 peak_tflops: float | None) -> list[dict[str, Any]]:
    """The PyTorch baseline's JSON lines (run it before JAX takes the GPU)."""
    if not script.is_file():
        raise FileNotFoundError(f"--baseline: no script at {script} (pass --baseline-script)")
    cmd = [sys.executable, str(script), "--seq", str(seq), "--frames", str(frames), "--res", str(res),
           "--steps", str(steps)] + (["--remat"] if remat else [])
    if peak_tflops:
        cmd += ["--peak-tflops", str(peak_tflops)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed (exit {proc.returncode}; it needs a CUDA GPU): "
                           f"{proc.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# -- main --------------------------------------------------------------------------------------

def bench(cfg: Config, *, seq: int, frames: int, res: int, objects: int, object_cells: int, batch: int,
          steps: int, warmup: int, seed: int = 0, breakdown: bool = False,
          profile_dir: Path | None = None) -> dict[str, Any]:
    """Measure and return the report (one JSON object)."""
    from traser_jax import data as data_lib
    from traser_jax import optim
    from traser_jax.train import Trainer

    data_lib.check_vision_cache(cfg)
    batch_np, sizes = synthetic_batch(cfg, seq=seq, frames=frames, res=res, objects=objects,
                                      object_cells=object_cells, batch=batch, seed=seed)
    pixels = batch_np["pixel_values"]
    trainer = Trainer(cfg)
    state = trainer.init_state(seed)
    if cfg.data.cache_vision_tokens:  # the tower's tokens in place of the pixels, as train.run feeds them
        encode = trainer.video_encoder(state)
        batch_np = {k: v for k, v in batch_np.items() if k != "pixel_values"}
        batch_np["video_tokens"] = np.stack([encode(p, g) for p, g in zip(pixels, batch_np["grid_thw"])])
    times, state, metrics, run_step = time_train_step(trainer, state, batch_np, warmup, steps)
    step_s = statistics.median(times)
    grid = tuple(int(x) for x in sizes["grid"])
    flops = model_flops(cfg, seq=seq, batch=batch, grid=grid, selected=sizes["selected"], objects=objects,
                        windows=sizes["windows"])
    devices = jax.devices()
    peak, peak_source = peak_flops(devices[0])
    params = optim.merge(state["params"], state["frozen"])
    vision_s = time_vision_forward(cfg, params, pixels[0], grid, steps)
    report = {
        **run_facts(cfg, batch=batch, seq=seq, num_devices=len(devices)), "device_kind": devices[0].device_kind,
        "frames": frames, "res": res, "objects": objects, "cached_vision_tokens": cfg.data.cache_vision_tokens,
        "selected_tokens": sizes["selected"], "windows": sizes["windows"], "answer_tokens": sizes["answer_tokens"],
        "steps": steps, "step_s": round(step_s, 5), "step_s_all": [round(t, 5) for t in times],
        "tokens_per_s": round(batch * seq / step_s, 1),
        "loss": float(metrics["loss"]),
        "model_flops_per_step": _sig(flops["total"]),
        "model_flops_by_part": {k: _sig(v) for k, v in flops.items() if k != "total"},
        "achieved_tflops": _sig(flops["total"] / step_s / 1e12),
        "peak_tflops_per_device": None if peak is None else _sig(peak / 1e12), "peak_source": peak_source,
        "mfu": None if peak is None else round(flops["total"] / step_s / (peak * len(devices)), 4),
        "vision_forward_s": round(vision_s, 5), "vision_frames_per_s": round(frames / vision_s, 2),
    }
    if breakdown:
        parts = time_breakdown(trainer, state, batch_np, steps)
        report["breakdown_s"] = {"vision_forward": round(vision_s, 5),
                                 "forward": round(parts["forward_s"], 5),
                                 "backward": round(parts["forward_backward_s"] - parts["forward_s"], 5),
                                 "optimizer": round(step_s - parts["forward_backward_s"], 5)}
    if profile_dir is not None:
        summary = profile_runs(run_step, profile_dir)
        report["profile_top"], report["profile_by_kind"] = summary["top"], summary["by_kind"]
        report["profile_dir"] = str(profile_dir)
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        report["peak_mem_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
    return report


def gib(plan: dict[str, int]) -> dict[str, float]:
    """A memory plan's bytes as GiB, to 1/1000."""
    return {k: round(v / 2 ** 30, 3) for k, v in plan.items()}


def gpu_target_devices(target_config: Path) -> list[jax.Device]:
    """One device of the GPU that an XLA target config describes (a `gpu_device_info` text proto, e.g.
    configs/gpu/h100.pbtxt), to compile for without one: needs jax's CUDA plugin installed."""
    import os

    from jax.experimental import topologies

    # Without a GPU the plugin cannot query the CUDA libraries' versions; compiling needs none of them.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                                target_config=Path(target_config).read_text())
    except (NotImplementedError, RuntimeError) as err:
        raise ValueError(f"--gpu-target needs jax's CUDA plugin (pip install 'jax[cuda13]'), loaded before anything "
                         f"else starts jax's backends: {err}") from err
    return list(topology.devices)


def memory_plan_report(cfg: Config, *, seq: int, frames: int, res: int, objects: int, object_cells: int,
                       batch: int, seed: int = 0, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """XLA's memory plan of the train step at these shapes (Trainer.memory_plan), GiB per device, on
    `devices` (default the local ones; maybe a GPU compiled for without one, `gpu_target_devices`)."""
    from traser_jax.train import Trainer, make_mesh

    batch_np, sizes = synthetic_batch(cfg, seq=seq, frames=frames, res=res, objects=objects,
                                      object_cells=object_cells, batch=batch, seed=seed)
    devices = list(devices or jax.devices())
    plan = Trainer(cfg, make_mesh(cfg.mesh, devices=devices)).memory_plan(batch_np)
    return {**run_facts(cfg, batch=batch, seq=seq, num_devices=len(devices), device=devices[0]),
            "frames": frames, "res": res, "objects": objects, "selected_tokens": sizes["selected"],
            "memory_plan_gib": gib(plan)}


def lm_memory_plan_report(cfg: Config, *, seq: int, batch: int, device: jax.Device | None = None) -> dict[str, Any]:
    """XLA's memory plan of the decoder-alone step (`lm_step_program`), GiB, on one `device`."""
    from traser_jax.train import memory_plan

    device = device or jax.devices()[0]
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ("one",)),
                                          jax.sharding.PartitionSpec())
    step, params, opt_state, tokens = lm_step_program(cfg, seq=seq, batch=batch, sharding=sharding)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
    return {**run_facts(cfg, batch=batch, seq=seq, num_devices=1, device=device),
            "lm_step": {"memory_plan_gib": gib(memory_plan(compiled))}}


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def human_line(r: dict[str, Any]) -> str:
    peak = "n/a" if r["peak_tflops_per_device"] is None else f"{r['peak_tflops_per_device']:g} TFLOP/s"
    line = f"{r['config']} on {r['num_devices']}x {r['device']}"
    if "step_s" in r:  # the whole step (not --lm-step-only)
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        line += (f": step {r['step_s']:.3f} s, "
                 f"{r['tokens_per_s']:,.0f} tokens/s (batch {r['batch']} x seq {r['seq']}), "
                 f"{r['achieved_tflops']:.3g} TFLOP/s = MFU {mfu} of {peak} ({r['peak_source']}); "
                 f"vision tower {r['vision_frames_per_s']:.1f} frames/s")
    else:
        line += f" (batch {r['batch']} x seq {r['seq']}, MFU of {peak})"
    if "breakdown_s" in r:
        line += "; " + ", ".join(f"{k} {v:.3f} s" for k, v in r["breakdown_s"].items())
    if "lm_step" in r:
        lm = r["lm_step"]
        line += f"; decoder alone {lm['step_s']:.3f} s, {lm['tokens_per_s']:,.0f} tokens/s"
        if lm["mfu"] is not None:
            line += f" (MFU {100 * lm['mfu']:.1f}%)"
        if "tokens_per_s_vs_baseline" in lm:
            line += f", {lm['tokens_per_s_vs_baseline']:.2f}x the baseline's language model"
    if "tokens_per_s_vs_baseline" in r:
        line += f"; {r['tokens_per_s_vs_baseline']:.2f}x the PyTorch baseline's tokens/s"
    if "tokens_per_s_vs_baseline_lm_plus_vision" in r:
        line += (f" ({r['tokens_per_s_vs_baseline_lm_plus_vision']:.2f}x its LM step plus vision forward, "
                 f"the same work)")
    return line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traser_jax.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="demo", help="a preset name in configs/ or a YAML path")
    parser.add_argument("--seq", type=int, default=2048, help="language-model tokens per video")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--res", type=int, default=224, help="frame side in pixels (a multiple of 28)")
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--object-cells", type=int, default=None,
                        help="merged-token cells per object and temporal grid (default: 1/8 of a frame)")
    parser.add_argument("--batch", type=int, default=1, help="videos per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the forward alone and forward + backward: breakdown_s splits the step "
                             "into forward (vision tower included), backward and optimizer")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also trace 3 steps with jax.profiler into DIR (TensorBoard / Perfetto) and report "
                             "the heaviest device events as profile_top, the time per kernel kind as "
                             "profile_by_kind (with --lm-step-only: of the decoder's step, in lm_step)")
    parser.add_argument("--lm-step", action="store_true",
                        help="also time the decoder alone as the PyTorch baseline trains its language model "
                             "(random tokens, loss on every position): lm_step, and its ratio to the baseline")
    parser.add_argument("--lm-step-only", action="store_true",
                        help="time only the decoder alone (lm_step), not the whole step: a quick way to compare "
                             "decoder variants (remat, attention, XLA flags)")
    parser.add_argument("--lm-variant", action="append", default=[], metavar="'[batch=N] KEY=VALUE ...'",
                        help="after the report, also time the decoder alone with these overrides on top of the "
                             "command's (and batch=N videos); repeatable, all in this one process: lm_variants")
    parser.add_argument("--gpu-target", default=None, metavar="PBTXT",
                        help="with --memory-plan: compile for the GPU this XLA target config describes (e.g. "
                             "configs/gpu/h100.pbtxt) without one; needs jax's CUDA plugin")
    parser.add_argument("--memory-plan", action="store_true",
                        help="only compile the step (with --lm-step-only: the decoder's) and report XLA's memory "
                             "plan per device (arguments, outputs, temporaries, peak; GiB) without allocating or "
                             "running anything")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the PyTorch baseline (GPU) with the same seq / frames / res")
    parser.add_argument("--baseline-script", default=str(BASELINE_SCRIPT))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.lm_step_only and args.breakdown:
        parser.error("--lm-step-only times the decoder alone; --breakdown is of the whole step")
    if args.memory_plan and args.lm_variant:
        parser.error("--memory-plan runs nothing; --lm-variant times the decoder")
    if args.gpu_target and not args.memory_plan:
        parser.error("--gpu-target compiles without a GPU: it goes with --memory-plan")
    try:
        cfg = config_lib.load(args.config, args.overrides)
        variants = [lm_variant(args.config, args.overrides, v, args.batch) for v in args.lm_variant]
    except config_lib.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cell = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    cells = args.object_cells or max(1, (args.res // cell) ** 2 // 8)
    if args.memory_plan:
        try:
            devices = gpu_target_devices(Path(args.gpu_target)) if args.gpu_target else None  # None: local
            if args.lm_step_only:
                report = lm_memory_plan_report(cfg, seq=args.seq, batch=args.batch,
                                               device=devices[0] if devices else None)
            else:
                report = memory_plan_report(cfg, seq=args.seq, frames=args.frames, res=args.res,
                                            objects=args.objects, object_cells=cells, batch=args.batch,
                                            seed=args.seed, devices=devices)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(report))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return 0
    baseline = None
    if args.baseline:  # before anything initializes JAX's backend, which claims most of the GPU memory
        # Hugging Face's gradient checkpointing recomputes whole layers: the baseline gets it only when our
        # step does too (remat full). A dots policy keeps every matmul output, so it runs against no remat.
        try:
            baseline = run_baseline(Path(args.baseline_script), seq=args.seq, frames=args.frames, res=args.res,
                                    steps=args.steps, remat=cfg.train.remat == "full", peak_tflops=None)
        except (FileNotFoundError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for line in baseline:  # kept in the log even if our own step fails below
            print(f"baseline: {json.dumps(line)}", file=sys.stderr, flush=True)
    try:
        if args.lm_step_only:
            report = lm_step_report(cfg, seq=args.seq, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                    seed=args.seed, profile_dir=Path(args.profile) if args.profile else None)
            # in the log before any variant, as the variants' rows: a run cut short still has it
            row = {k: v for k, v in report["lm_step"].items() if not k.startswith("profile")}
            print(f"lm step: {json.dumps(row)}", file=sys.stderr, flush=True)
        else:
            report = bench(cfg, seq=args.seq, frames=args.frames, res=args.res, objects=args.objects,
                           object_cells=cells, batch=args.batch, steps=args.steps, warmup=args.warmup,
                           seed=args.seed, breakdown=args.breakdown,
                           profile_dir=Path(args.profile) if args.profile else None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.lm_step and not args.lm_step_only:  # after bench() has let go of the full model's state
        peak = report["peak_tflops_per_device"]  # the same peak as the full step's MFU
        report["lm_step"] = time_lm_step(cfg, seq=args.seq, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                         peak=None if peak is None else peak * 1e12, seed=args.seed)
    if variants:
        report["lm_variants"] = time_lm_variants(variants, seq=args.seq, steps=args.steps, warmup=args.warmup,
                                                 seed=args.seed)
    if baseline is not None:
        report["baseline"] = baseline
        lm = next((b for b in baseline if b.get("what") == "hf_qwen25vl3b_lm_train_step"), None)
        whole = "tokens_per_s" in report  # not --lm-step-only
        if lm and whole:
            report["tokens_per_s_vs_baseline"] = round(report["tokens_per_s"] / lm["tokens_per_s"], 3)
        for row in ([report["lm_step"]] if "lm_step" in report else []) + report.get("lm_variants", []):
            if lm and "tokens_per_s" in row:  # language model against language model
                row["tokens_per_s_vs_baseline"] = round(row["tokens_per_s"] / lm["tokens_per_s"], 3)
        vis = next((b for b in baseline if b.get("what") == "hf_qwen25vl_vision_forward"), None)
        if vis and whole:
            report["vision_frames_per_s_vs_baseline"] = round(report["vision_frames_per_s"] / vis["frames_per_s"], 3)
        if lm and vis and whole:  # the same work as our step: the LM train step plus the frozen tower's forward
            same_work = lm["seq"] / (lm["step_s"] + vis["forward_s"])
            report["baseline_lm_plus_vision_tokens_per_s"] = round(same_work, 1)
            report["tokens_per_s_vs_baseline_lm_plus_vision"] = round(report["tokens_per_s"] / same_work, 3)
    print(json.dumps(report))
    print(human_line(report), file=sys.stderr)
    profiled = report if "profile_by_kind" in report else report.get("lm_step", {})  # --lm-step-only --profile
    if "profile_by_kind" in profiled:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in profiled["profile_by_kind"].items())
        print(f"  device ms/step by kernel kind: {kinds}", file=sys.stderr)
    for row in profiled.get("profile_top", []):
        print(f"  {row['ms_per_step']:9.3f} ms/step {100 * row['share_of_lane']:5.1f}%  {row['event'][:80]}  "
              f"[{row['lane']}] {row['source'][:120]}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The optimizer recipe (per-group learning rates on the published schedule, weight-decay mask, the
frozen vision tower and merger split off), the micro-batch layout, the chunked loss, train.weight_cast,
cached vision tokens (data.cache_vision_tokens), and the launcher's handling of a bad key.

Whole training runs (metrics, TensorBoard, checkpoints, resume, NaN stop) are in test_train_resume.py,
the sharded step in test_train_sharding.py."""
import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from traser_jax import config as config_lib
from traser_jax import optim
from traser_jax import tokens as tokens_lib
from traser_jax.config import OptimConfig
from traser_jax.model import abstract_params
from traser_jax.train import micro_batches, sequence_loss

from train_fixtures import REPO

PEAKS = {"llm": 2e-5, "resampler": 1e-4, "merger": 5e-5}


def hf_cosine_with_warmup(step: int, peak: float, warmup: int, total: int) -> float:
    """transformers.get_cosine_schedule_with_warmup (one half cosine), written out."""
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def test_defaults_are_the_published_recipe():
    cfg = OptimConfig()
    assert (cfg.lr_llm, cfg.lr_resampler, cfg.lr_merger, cfg.lr_vision) == (2e-5, 1e-4, 5e-5, 0.0)
    assert (cfg.warmup_ratio, cfg.weight_decay, cfg.clip_norm) == (0.01, 0.01, 1.0)
    assert optim.warmup_steps(cfg) == 370  # 1% of ~37K steps


@pytest.mark.parametrize("num_steps", [1000, 37000, 250])
def test_learning_rates_warm_up_then_follow_the_cosine(num_steps):
    cfg = OptimConfig(num_steps=num_steps)
    warmup = math.ceil(0.01 * num_steps)
    assert optim.warmup_steps(cfg) == warmup
    steps = sorted({0, 1, warmup - 1, warmup, warmup + 1, num_steps // 2, num_steps - 1, num_steps,
                    *np.random.default_rng(num_steps).integers(0, num_steps, 20).tolist()})
    for step in steps:
        got = optim.learning_rates(cfg, step)
        assert set(got) == set(PEAKS)
        for group, peak in PEAKS.items():
            want = hf_cosine_with_warmup(step, peak, warmup, num_steps)
            # float32 schedule: 1e-6 of the peak near the end, where 1 + cos cancels
            assert got[group] == pytest.approx(want, rel=1e-5, abs=1e-6 * peak), (group, step)
    assert optim.learning_rates(cfg, warmup)["llm"] == pytest.approx(2e-5, rel=1e-6)  # the peak
    assert optim.learning_rates(cfg, 0)["llm"] == 0.0


def _group_tree(value):
    """One small parameter per group, at the paths the model uses (plus a bias and a norm scale)."""
    return {"llm": {"layers": {"q_proj": {"kernel": value((2, 3)), "bias": value((3,))},
                               "input_layernorm": {"scale": value((3,))}}},
            "otr_resampler": {"latents": value((2, 2))},
            "twr_resampler": {"latents": value((2, 2))},
            "vision": {"merger": {"fc1": {"kernel": value((2, 2))}}}}


def test_each_group_is_updated_at_its_own_rate():
    """With a constant gradient Adam's normalized step is 1, so a parameter starting at 0 sits at minus
    the sum of its group's learning rates."""
    cfg = OptimConfig(num_steps=10, weight_decay=0.0)  # warmup: 1 step (update 0 has rate 0)
    params = _group_tree(jnp.zeros)
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)
    update_fn = jax.jit(tx.update)
    for update in range(4):
        updates, state = update_fn(grads, state, params)
        params = optax.apply_updates(params, updates)
        for path, value in traverse_util.flatten_dict(params).items():
            group = optim.group_of(path)
            want = -sum(optim.learning_rates(cfg, k)[group] for k in range(update + 1))
            # rtol: Adam's float32 bias correction 1 - b2^t cancels (~1e-5 off at t = 2)
            np.testing.assert_allclose(np.asarray(value), want, rtol=1e-4, err_msg=str((update, path)))


def test_a_bfloat16_first_moment_halves_its_state_and_keeps_the_update():
    """optim.mu_dtype=bfloat16 stores AdamW's first moment in bf16 (the second stays float32). On a fresh
    random gradient, three updates stay within bf16 rounding (2^-8) of the float32 recipe's; an unknown
    dtype is refused with the choices named."""
    params = _group_tree(jnp.zeros)
    rng = np.random.default_rng(7)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    results = {}
    for mu in ("float32", "bfloat16"):
        tx = optim.make_optimizer(OptimConfig(num_steps=10, mu_dtype=mu), params)
        state, p = tx.init(params), params
        for _ in range(3):  # update 0 has learning rate 0
            updates, state = jax.jit(tx.update)(grads, state, p)
            p = optax.apply_updates(p, updates)
        adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState)]
        assert {x.dtype for a in adam for x in jax.tree.leaves(a.mu)} == {jnp.dtype(mu)}
        assert {x.dtype for a in adam for x in jax.tree.leaves(a.nu)} == {jnp.dtype("float32")}
        results[mu] = p
    for path, want in traverse_util.flatten_dict(results["float32"]).items():
        got = traverse_util.flatten_dict(results["bfloat16"])[path]
        lr = sum(optim.learning_rates(OptimConfig(num_steps=10), k)[optim.group_of(path)] for k in range(3))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=lr * 2 ** -7, err_msg=str(path))
        assert np.abs(np.asarray(want)).max() > lr / 2  # the updates moved the parameters
    with pytest.raises(config_lib.ConfigError, match="mu_dtype 'float16'.*float32, bfloat16"):
        optim.make_optimizer(OptimConfig(mu_dtype="float16"), params)


def test_weight_decay_spares_biases_and_norm_scales():
    """A zero gradient leaves only the decay: -lr * wd * p on kernels, embeddings and latents, nothing
    on biases and norm scales (as the Hugging Face Trainer)."""
    cfg = OptimConfig(num_steps=10)
    params = _group_tree(lambda shape: jnp.ones(shape))
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update_fn = jax.jit(tx.update)
    for _ in range(2):  # update 0 has learning rate 0
        updates, state = update_fn(zeros, state, params)
    for path, u in traverse_util.flatten_dict(updates).items():
        lr = optim.learning_rates(cfg, 1)[optim.group_of(path)]
        want = 0.0 if path[-1] in ("bias", "scale") else -lr * cfg.weight_decay
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, atol=1e-15, err_msg=str(path))


def test_vision_tower_is_split_off_when_frozen():
    params = abstract_params(config_lib.load("tiny"), boxed=False)
    trainable, frozen = optim.split_frozen(params, OptimConfig())
    frozen_paths, trainable_paths = traverse_util.flatten_dict(frozen), traverse_util.flatten_dict(trainable)
    assert frozen_paths and all(p[0] == "vision" and "merger" not in p for p in frozen_paths)
    assert {p[0] for p in trainable_paths} == {"vision", "llm", "otr_resampler", "twr_resampler"}
    assert all("merger" in p for p in trainable_paths if p[0] == "vision")
    assert len(frozen_paths) + len(trainable_paths) == len(traverse_util.flatten_dict(params))
    # The optimizer holds moments for the trainable parameters only.
    opt_state = jax.eval_shape(optim.make_optimizer(OptimConfig(), trainable).init, trainable)
    moments = sum(leaf.size for leaf in jax.tree.leaves(opt_state) if leaf.ndim > 0)
    assert moments == 2 * sum(leaf.size for leaf in jax.tree.leaves(trainable))
    # A trained vision tower (lr_vision > 0) stays in the trainable tree, with its own rate.
    trainable, frozen = optim.split_frozen(params, OptimConfig(lr_vision=1e-6))
    assert frozen == {} and "vision" in optim.learning_rates(OptimConfig(lr_vision=1e-6), 5)
    # The merger too, at lr_merger 0: the whole vision module is frozen, the rest trains.
    trainable, frozen = optim.split_frozen(params, OptimConfig(lr_merger=0.0))
    vision = {p for p in traverse_util.flatten_dict(params) if p[0] == "vision"}
    assert set(traverse_util.flatten_dict(frozen)) == vision
    assert set(optim.learning_rates(OptimConfig(lr_merger=0.0), 5)) == {"llm", "resampler"}


def test_micro_batches_take_every_devices_share():
    """8 rows laid out over 4 devices (2 rows each), 2 micro-batches: each holds one row per device."""
    batch = {"x": np.arange(8 * 3).reshape(8, 3)}
    micro = micro_batches(batch, 2)["x"]
    assert micro.shape == (2, 4, 3)
    rows = micro[..., 0] // 3
    np.testing.assert_array_equal(rows, [[0, 2, 4, 6], [1, 3, 5, 7]])
    assert sorted(rows.ravel().tolist()) == list(range(8))


def test_train_sh_rejects_an_unknown_key_naming_the_closest():
    proc = subprocess.run(["launch/train.sh", "configs/tiny.yaml", "optim.lr_lm=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unknown config key 'optim.lr_lm'" in proc.stderr
    assert "optim.lr_llm" in proc.stderr.split("closest valid keys:")[1]


@pytest.mark.parametrize("chunk", [8, 12, 36, 100])
def test_loss_in_chunks_equals_the_loss_over_whole_sequences(chunk):
    """sequence_loss with chunk > 0 (scan over chunks, each recomputed in the backward) gives the loss and
    gradients of the whole-sequence loss, and both match a float64 numpy cross-entropy; 37 positions, so
    8 and 12 leave a padded last chunk, 36 is one chunk and 100 falls back to the whole sequence."""
    rng = np.random.default_rng(chunk)
    batch, length, width, vocab = 2, 37, 16, 50
    hidden = jnp.asarray(rng.normal(size=(batch, length, width)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(vocab, width)) * 0.5, jnp.float32)
    labels = rng.integers(0, vocab, (batch, length))
    labels[0, :20] = labels[1, :5] = tokens_lib.IGNORE_INDEX  # prompts of two lengths carry no loss
    labels = jnp.asarray(labels)

    def mean_loss(h, t, c):
        total, count = sequence_loss(h, labels, lambda x: x @ t.T, c)
        return total / count, count

    (whole, n_whole), g_whole = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(hidden, table, 0)
    (chunked, n_chunked), g_chunked = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
        hidden, table, chunk)

    logits = np.asarray(hidden, np.float64)[:, :-1] @ np.asarray(table, np.float64).T
    targets = np.asarray(labels)[:, 1:]
    keep = targets != tokens_lib.IGNORE_INDEX
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    reference = nll[keep].mean()
    assert int(n_whole) == int(n_chunked) == keep.sum() == 17 + 32
    assert abs(float(whole) - reference) <= 1e-5 * reference
    assert abs(float(chunked) - reference) <= 1e-5 * reference
    for a, b in zip(g_chunked, g_whole):
        assert float(jnp.abs(b).max()) > 0
        assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())


def _scans(jaxpr):
    """Every scan equation of a jaxpr, sub-jaxprs (remat, pjit, scan bodies) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _scans(inner)


# 49 s on the 2-core machine (session 11); back in CI since session 14 (two workers), as the GPU runs use per_step
def test_weight_cast_per_step_gives_the_per_layer_numbers(tmp_path):
    """bf16 compute over float32 weights, two micro-batches, the tower frozen: casting the layer stacks
    once per step (train.weight_cast=per_step) gives the loss and float32 gradients of casting each
    layer's weights inside the loops, and then no layer loop sees a float32 stack."""
    import copy

    from traser_jax import data as data_lib
    from traser_jax.train import Trainer, layer_stack_paths, make_grad_fn, statics_of
    from train_fixtures import train_overrides, write_toyworld

    data = write_toyworld(tmp_path / "data", num_videos=4)
    cfg = config_lib.load("tiny", train_overrides(data, tmp_path / "run", "train.compute_dtype=bfloat16",
                                                  "data.global_batch_size=4", "data.grad_accum_steps=2",
                                                  "optim.lr_vision=0"))
    batch = next(iter(data_lib.train_dataset(cfg, data_lib.run_tokenizer(cfg))))
    per_step_cfg = config_lib.apply_overrides(copy.deepcopy(cfg), {"train.weight_cast": "per_step"})
    per_layer, per_step = Trainer(cfg), Trainer(per_step_cfg)
    state = jax.device_get(per_layer.init_state(0))
    loss_a, grads_a = jax.device_get(per_layer.loss_and_grads(jax.device_put(state, per_layer.state_shardings), batch))
    loss_b, grads_b = jax.device_get(per_step.loss_and_grads(jax.device_put(state, per_step.state_shardings), batch))
    assert np.isfinite(loss_a) and abs(float(loss_b) - float(loss_a)) <= 1e-6 * abs(float(loss_a))
    flat_a, flat_b = traverse_util.flatten_dict(grads_a), traverse_util.flatten_dict(grads_b)
    assert flat_a.keys() == flat_b.keys()
    # A weight a layer uses twice (the resamplers' key and value projections, over the context and over
    # the latents) has its two gradients summed in bf16, not float32: bf16 rounding. Every other
    # gradient is the same to the bit.
    twice = {(resampler, "layers", proj, "kernel") for resampler in ("otr_resampler", "twr_resampler")
             for proj in ("k_proj", "v_proj")}
    for path, a in flat_a.items():
        b = flat_b[path]
        assert a.dtype == b.dtype == np.float32, path
        assert float(np.abs(a).max()) > 0, path
        if path in twice:
            assert float(np.abs(b - a).max()) <= 2 ** -7 * float(np.abs(a).max()), path
        else:
            np.testing.assert_array_equal(b, a, err_msg=str(path))

    # What the layer loops see: per_layer's float32 stacks (and bf16 casts saved for the backward),
    # per_step's bf16 stacks only.
    stack_shapes = {tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(
        abstract_params(cfg, boxed=False)).items() if path in layer_stack_paths(cfg)}
    arrays = {k: np.asarray(v) for k, v in per_layer.put_batch(batch).items()}
    trainable, frozen = state["params"], state["frozen"]
    for trainer, want in ((per_layer, {jnp.float32, jnp.bfloat16}), (per_step, {jnp.bfloat16})):
        grad_fn = make_grad_fn(trainer.model, 1)
        with trainer.context():
            jaxpr = jax.make_jaxpr(lambda t, f, b: grad_fn(t, f, b, statics_of(batch)))(trainable, frozen, arrays)
        seen = {v.aval.dtype for eqn in _scans(jaxpr.jaxpr) for v in eqn.invars
                if tuple(v.aval.shape) in stack_shapes and v.aval.shape[0] == eqn.params["length"]}
        assert seen == {jnp.dtype(d) for d in want}, (trainer.cfg.train.weight_cast, seen)


def test_unrolled_layer_loops_give_the_looped_step(tmp_path):
    """train.unroll_layers (float32, remat dots_saveable, the tower trained too): no layer loop is left
    in the step's program, over the same parameter tree, and its loss and gradients are the loops'."""
    import copy

    from traser_jax import data as data_lib
    from traser_jax.train import Trainer
    from train_fixtures import train_overrides, write_toyworld

    data = write_toyworld(tmp_path / "data", num_videos=2)
    cfg = config_lib.load("tiny", train_overrides(data, tmp_path / "run", "train.compute_dtype=float32",
                                                  "train.remat=dots_saveable", "data.global_batch_size=2",
                                                  "optim.lr_vision=1e-5"))
    batch = next(iter(data_lib.train_dataset(cfg, data_lib.run_tokenizer(cfg))))
    unrolled_cfg = config_lib.apply_overrides(copy.deepcopy(cfg), {"train.unroll_layers": True})
    looped, unrolled = Trainer(cfg), Trainer(unrolled_cfg)
    # Loops in the lowered step: the layer loops' (tower, two resamplers, decoder; forward and backward),
    # and the micro-batch accumulation's, which is the one left unrolled.
    loops = {name: trainer.lowered_step(batch).as_text().count("stablehlo.while")
             for name, trainer in (("looped", looped), ("unrolled", unrolled))}
    assert loops["looped"] >= 8 and loops["unrolled"] == 1, loops

    state = jax.device_get(looped.init_state(0))
    loss_a, grads_a = jax.device_get(looped.loss_and_grads(jax.device_put(state, looped.state_shardings), batch))
    loss_b, grads_b = jax.device_get(unrolled.loss_and_grads(jax.device_put(state, unrolled.state_shardings),
                                                             batch))
    assert np.isfinite(loss_a) and abs(float(loss_b) - float(loss_a)) <= 1e-5 * abs(float(loss_a))
    flat_a, flat_b = traverse_util.flatten_dict(grads_a), traverse_util.flatten_dict(grads_b)
    assert flat_a.keys() == flat_b.keys() and any(path[0] == "vision" for path in flat_a)
    for path, a in flat_a.items():
        assert float(np.abs(a).max()) > 0, path
        np.testing.assert_allclose(flat_b[path], a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()),
                                   err_msg=str(path))


def test_cached_vision_tokens_give_the_uncached_step(tmp_path):
    """data.cache_vision_tokens (tower and merger frozen): batches carry the tower's output tokens in place
    of the pixels, and the step computes the same loss and gradients from them (float32)."""
    import copy

    from traser_jax import data as data_lib
    from traser_jax.train import Trainer
    from train_fixtures import train_overrides, write_toyworld

    data = write_toyworld(tmp_path / "data", num_videos=4)
    cfg = config_lib.load("tiny", train_overrides(data, tmp_path / "run", "data.global_batch_size=4",
                                                  "data.cache_in_memory=true", "optim.lr_vision=0",
                                                  "optim.lr_merger=0"))
    tokenizer = data_lib.run_tokenizer(cfg)  # sets cfg.tokens' special ids: copy after it
    cached_cfg = config_lib.apply_overrides(copy.deepcopy(cfg), {"data.cache_vision_tokens": True})
    trainer = Trainer(cfg)
    state = trainer.init_state(0)
    assert "merger" not in state["params"].get("vision", {})  # frozen with the tower
    batch = next(iter(data_lib.train_dataset(cfg, tokenizer)))
    with pytest.raises(ValueError, match="encode_video"):
        data_lib.train_dataset(cached_cfg, tokenizer)
    cached = next(iter(data_lib.train_dataset(cached_cfg, tokenizer, encode_video=trainer.video_encoder(state))))
    assert "pixel_values" not in cached and "pixel_values" in batch
    np.testing.assert_array_equal(cached["input_ids"], batch["input_ids"])  # the same videos, in order
    t, h, w = batch["grid_thw"][0]
    merge = cfg.vision.spatial_merge_size
    assert cached["video_tokens"].shape == (4, t * h * w // merge ** 2, cfg.vision.out_hidden_size)
    assert float(np.abs(cached["video_tokens"]).max()) > 0

    loss, grads = jax.device_get(trainer.loss_and_grads(state, batch))
    loss_c, grads_c = jax.device_get(Trainer(cached_cfg).loss_and_grads(state, cached))
    assert np.isfinite(loss) and abs(float(loss_c) - float(loss)) <= 1e-5 * abs(float(loss))
    flat, flat_c = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(grads_c)
    assert flat.keys() == flat_c.keys()
    for path, g in flat.items():
        scale = float(np.abs(g).max())
        assert scale > 0, path
        assert float(np.abs(flat_c[path] - g).max()) <= 1e-5 * scale, path


@pytest.mark.parametrize("overrides", [["optim.lr_vision=1e-4", "optim.lr_merger=0"],
                                       ["optim.lr_vision=0", "optim.lr_merger=1e-4"],
                                       ["optim.lr_vision=0", "optim.lr_merger=0", "data.cache_in_memory=false"]])
def test_cached_vision_tokens_need_a_frozen_tower_in_memory(overrides):
    from traser_jax import data as data_lib

    cfg = config_lib.load("tiny", ["data.cache_in_memory=true", "data.cache_vision_tokens=true", *overrides])
    with pytest.raises(config_lib.ConfigError, match="cache_vision_tokens needs"):
        data_lib.check_vision_cache(cfg)

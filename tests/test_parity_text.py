"""The Flax Qwen2.5 decoder equals transformers' (float32, random weights): logits for several
KV-head ratios and tied/untied heads, 1-D positions = M-RoPE with equal axes, padding, and
KV-cache decoding (prefill + steps) equal to the full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity_helpers import FLOAT32, TOL, build_qwen, build_resampler, rel_err, save_traser_dir, tiny_config

from traser_jax import convert
from traser_jax.modules.text import TextDecoder, init_cache

CASES = {  # (heads, kv heads, tied lm_head)
    "gqa_4_2_tied": ["text.num_heads=4", "text.num_kv_heads=2", "text.tie_word_embeddings=true"],
    "mqa_4_1_untied": ["text.num_heads=4", "text.num_kv_heads=1", "text.tie_word_embeddings=false"],
    "mha_4_4_tied": ["text.num_heads=4", "text.num_kv_heads=4", "text.tie_word_embeddings=true"],
}


def convert_case(tmp_path, overrides, seed):
    cfg = tiny_config(*overrides)
    qwen = build_qwen(cfg, seed=seed)
    hf_dir = save_traser_dir(tmp_path / "hf", qwen, build_resampler(cfg, 1), build_resampler(cfg, 2))
    cfg, params = convert.from_hf(hf_dir, tmp_path / "ckpt", preset="tiny", overrides=FLOAT32, progress=False)
    return cfg, params["llm"], qwen


def decoder_fns(cfg):
    dec = TextDecoder(cfg.text)

    @jax.jit
    def full(params, ids, positions, mask):
        embeds = dec.apply({"params": params}, ids, method=TextDecoder.embed)
        return dec.apply({"params": params}, embeds, positions, mask)[0]

    @jax.jit
    def cached(params, ids, positions, mask, cache, index):
        embeds = dec.apply({"params": params}, ids, method=TextDecoder.embed)
        return dec.apply({"params": params}, embeds, positions, mask, cache=cache, cache_index=index)

    return full, cached


def random_batch(cfg, seed, batch=2, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.text.vocab_size, (batch, length))
    positions = np.stack([np.arange(length) + 7 * b for b in range(batch)])  # row 1 starts at 7: not the index
    mask = np.ones((batch, length), np.int64)
    mask[1, -3:] = 0  # right padding
    return ids, positions, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits(tmp_path, case):
    cfg, params, qwen = convert_case(tmp_path, CASES[case], seed=len(case))
    full, cached = decoder_fns(cfg)
    ids, positions, mask = random_batch(cfg, seed=len(case))
    valid = mask.astype(bool)
    ours = np.asarray(full(params, ids, positions, mask))
    with torch.no_grad():
        ref = qwen(input_ids=torch.tensor(ids), position_ids=torch.tensor(positions),
                   attention_mask=torch.tensor(mask)).logits.numpy()
    assert rel_err(ours[valid], ref[valid]) <= TOL
    if case != "gqa_4_2_tied":
        return
    # KV cache: prefill 7 tokens, then one token per step; equal to the full forward.
    cache = init_cache(cfg.text, ids.shape[0], 16)
    prefill = 7
    logits, cache = cached(params, ids[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache, 0)
    steps = [np.asarray(logits)]
    for i in range(prefill, ids.shape[1]):
        logits, cache = cached(params, ids[:, i:i + 1], positions[:, i:i + 1], mask[:, i:i + 1], cache, i)
        steps.append(np.asarray(logits))
    decoded = np.concatenate(steps, axis=1)
    assert rel_err(decoded[valid], ours[valid]) <= TOL
    assert np.asarray(cache["mask"])[:, :ids.shape[1]].tolist() == valid.tolist()


def test_1d_positions_equal_mrope_with_equal_axes(tmp_path):
    """TRASER's plain positions: HF given explicit 3-axis ids (all three equal) gives our logits."""
    cfg, params, qwen = convert_case(tmp_path, CASES["gqa_4_2_tied"], seed=5)
    full, _ = decoder_fns(cfg)
    ids, positions, _ = random_batch(cfg, seed=6)
    positions = positions * 5 + 3  # spread out: every M-RoPE band sees large angles
    mask = np.ones_like(ids)
    three_axes = torch.tensor(positions)[None].expand(3, -1, -1)
    with torch.no_grad():
        ref = qwen(input_ids=torch.tensor(ids), position_ids=three_axes).logits.numpy()
    assert rel_err(full(params, ids, positions, mask), ref) <= TOL
    # and the positions matter: a gap in the middle changes the logits after it
    gapped = positions.copy()
    gapped[:, 6:] += 3
    assert rel_err(full(params, ids, gapped, mask)[:, 6:], ref[:, 6:]) > 1e-3


def test_cache_continues_after_padded_prefill(tmp_path):
    """Row 1's prefill is right-padded; its decode steps continue at the next cache slot with the
    next position, and match a forward of the unpadded sequence."""
    cfg, params, _ = convert_case(tmp_path, CASES["mqa_4_1_untied"], seed=9)
    full, cached = decoder_fns(cfg)
    rng = np.random.default_rng(10)
    seq = rng.integers(0, cfg.text.vocab_size, 10)
    ids = np.zeros((1, 6), np.int64)
    ids[0, :4] = seq[:4]  # 4 real tokens + 2 padding slots
    mask = np.array([[1, 1, 1, 1, 0, 0]])
    cache = init_cache(cfg.text, 1, 12)
    _, cache = cached(params, ids, np.arange(6)[None], mask, cache, 0)
    steps = []
    for j, token in enumerate(seq[4:]):
        logits, cache = cached(params, np.array([[token]]), np.array([[4 + j]]), np.array([[1]]), cache, 6 + j)
        steps.append(np.asarray(logits)[0, 0])
    ref = np.asarray(full(params, seq[None], np.arange(10)[None], np.ones((1, 10))))[0, 4:]
    assert rel_err(np.stack(steps), ref) <= TOL


def test_remat_gives_the_same_gradients():
    """Rematerialised layers (train.remat=dots_and_attention_saveable, traser_3b's; without cuDNN it
    keeps what dots_saveable keeps) recompute activations in the backward pass: the same gradients as
    without remat."""
    cfg = tiny_config()
    ids, positions, mask = random_batch(cfg, seed=12)
    base = TextDecoder(cfg.text)
    params = base.init(jax.random.key(0), jnp.zeros((2, 12, 64)), positions, mask)["params"]

    def grads(module):
        def loss(p):
            embeds = module.apply({"params": p}, ids, method=TextDecoder.embed)
            return jnp.mean(module.apply({"params": p}, embeds, positions, mask)[0] ** 2)
        return jax.jit(jax.grad(loss))(params)

    expected, got = grads(base), grads(TextDecoder(cfg.text, remat="dots_and_attention_saveable"))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_unrolled_layers_give_the_scanned_logits_cache_and_gradients():
    """train.unroll_layers emits the layers one after another, over the same stacked parameters: the
    same logits, KV cache and (rematerialised) gradients as the loop."""
    cfg = tiny_config()
    ids, positions, mask = random_batch(cfg, seed=13)
    loop = TextDecoder(cfg.text, remat="dots_saveable")
    unrolled = TextDecoder(cfg.text, remat="dots_saveable", unroll_layers=True)
    params = loop.init(jax.random.key(1), jnp.zeros((2, 12, 64)), positions, mask)["params"]

    def run(module):
        def loss(p):
            embeds = module.apply({"params": p}, ids, method=TextDecoder.embed)
            return jnp.mean(module.apply({"params": p}, embeds, positions, mask)[0] ** 2)

        embeds = module.apply({"params": params}, ids, method=TextDecoder.embed)
        logits, cache = module.apply({"params": params}, embeds, positions, mask,
                                     cache=init_cache(cfg.text, 2, 16), cache_index=0)
        return logits, cache, jax.jit(jax.grad(loss))(params)

    for expected, got in zip(jax.tree.leaves(run(loop)), jax.tree.leaves(run(unrolled))):
        assert float(jnp.abs(expected).max()) > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-7)


def test_dots_and_attention_saveable_runs_the_fused_attention_forward_once(monkeypatch):
    """With attention_impl=cudnn, dots_saveable makes the backward run cuDNN's attention forward again
    (its outputs are no dot); dots_and_attention_saveable keeps them, so the gradient's program has one
    forward per layer. Traced, not run, on CPU: jax's cuDNN checks are patched to pass, since tracing
    needs no GPU. If jax renames the primitive, this fails: the policy would quietly stop saving it."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)
    cfg = tiny_config()
    ids, positions, mask = random_batch(cfg, seed=15, length=16)

    def forwards_in_gradient(remat):
        module = TextDecoder(cfg.text, dtype=jnp.bfloat16, remat=remat, attention_impl="cudnn")
        params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, 16, 64), jnp.bfloat16), positions,
                                mask)["params"]

        def loss(p):
            embeds = module.apply({"params": p}, ids, method=TextDecoder.embed)
            return jnp.mean(module.apply({"params": p}, embeds, positions, mask)[0].astype(jnp.float32) ** 2)
        program = str(jax.make_jaxpr(jax.grad(loss))(params))  # the layer loop's body appears once
        return program.count("dot_product_attention_fwd"), program.count("dot_product_attention_bwd")

    assert forwards_in_gradient("dots_saveable") == (2, 1)
    assert forwards_in_gradient("dots_and_attention_saveable") == (1, 1)


def test_bfloat16_compute_stays_close(tmp_path):
    """train.compute_dtype=bfloat16 (float32 params, float32 softmax/norms/logits) tracks float32."""
    cfg, params, _ = convert_case(tmp_path, CASES["gqa_4_2_tied"], seed=13)
    ids, positions, mask = random_batch(cfg, seed=14, batch=2, length=32)
    full32, _ = decoder_fns(cfg)
    dec16 = TextDecoder(cfg.text, dtype=jnp.bfloat16)
    embeds = dec16.apply({"params": params}, ids, method=TextDecoder.embed)
    logits16, _ = jax.jit(lambda p, e: dec16.apply({"params": p}, e, positions, mask))(params, embeds)
    assert logits16.dtype == jnp.float32 and embeds.dtype == jnp.bfloat16
    assert rel_err(logits16, full32(params, ids, positions, mask)) < 3e-2


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_takes_lengths_for_the_mask(causal):
    """attention(..., kv_lengths=, causal=) with impl 'xla' (the path cuDNN takes: lengths and a causal
    flag, no mask tensor) equals einsum with the mask those lengths state, grouped-query heads and
    extra batch axes included; a mask-only call still works on the fused path."""
    from traser_jax.modules.layers import attention

    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((2, 3, 6, 4, 8), (2, 3, 6, 2, 8), (2, 3, 6, 2, 8)))
    lengths = jnp.asarray(rng.integers(1, 7, (2, 3)), jnp.int32)
    mask = jnp.arange(6)[None, None, None, :] < lengths[..., None, None]  # [2, 3, 1, K]
    if causal:
        mask = mask & jnp.tril(jnp.ones((6, 6), bool))
    ref = attention(q, k, v, mask)
    fused = attention(q, k, v, mask, kv_lengths=lengths, causal=causal, impl="xla")
    assert rel_err(np.asarray(fused), np.asarray(ref)) <= 1e-6
    assert rel_err(np.asarray(attention(q, k, v, mask, impl="xla")), np.asarray(ref)) <= 1e-6


def test_fused_attention_lengths_batch_under_vmap(monkeypatch):
    """Lengths that do not depend on the vmapped input (the vision tower's window layout, the same for
    every video) trace through cuDNN's batching rule under the model's vmap over videos: jax 0.10's rule
    otherwise reshapes them to the batched queries' row count and fails. Traced on CPU, as above."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from traser_jax.modules.layers import attention
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)
    q = jnp.zeros((3, 4, 16, 2, 64), jnp.bfloat16)  # 3 videos of 4 windows of 16 tokens
    lengths = jnp.array([16, 9, 16, 5])

    def one_video(x):
        return attention(x, x, x, None, kv_lengths=lengths, impl="cudnn")
    program = jax.make_jaxpr(jax.vmap(one_video))(q)
    assert "dot_product_attention_fwd" in str(program)
    assert program.out_avals[0].shape == q.shape

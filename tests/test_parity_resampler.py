"""The packed, segment-masked Flax resampler equals transformers' Idefics2PerceiverResampler run
per segment with its attention mask (float32, random weights), including a segment with no
token, padding, tokens of several segments interleaved, and several KV-head ratios."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity_helpers import FLOAT32, TOL, build_qwen, build_resampler, rel_err, save_traser_dir, tiny_config

from traser_jax import convert
from traser_jax.modules.resampler import PerceiverResampler

KV_CASES = {"kv2": "resampler.num_kv_heads=2", "kv1": "resampler.num_kv_heads=1", "kv4": "resampler.num_kv_heads=4"}


@pytest.fixture(scope="module")
def kv2(tmp_path_factory):
    return convert_case(tmp_path_factory.mktemp("kv2"), KV_CASES["kv2"])


def convert_case(tmp_path, kv_override, resampler_config_in_json=True):
    cfg = tiny_config(kv_override)
    otr, twr = build_resampler(cfg, seed=21), build_resampler(cfg, seed=22)
    hf_dir = save_traser_dir(tmp_path / "hf", build_qwen(cfg, seed=20), otr, twr,
                             with_resampler_config=resampler_config_in_json)
    cfg, params = convert.from_hf(hf_dir, tmp_path / "ckpt", preset="tiny", overrides=FLOAT32, progress=False)
    return cfg, params, otr, twr


def hf_per_segment(resampler, context, segment, num_segments, rng):
    """The reference: each segment's tokens (in packed order) as one padded batch row, padding = junk."""
    longest = max(1, max(int((segment == s).sum()) for s in range(num_segments))) + 2
    batch = rng.standard_normal((num_segments, longest, context.shape[1])).astype(np.float32)
    mask = np.zeros((num_segments, longest), np.int64)
    for s in range(num_segments):
        tokens = context[segment == s]
        batch[s, :len(tokens)] = tokens
        mask[s, :len(tokens)] = 1
    with torch.no_grad():
        return resampler(context=torch.tensor(batch), attention_mask=torch.tensor(mask)).numpy()


def packed_example(rng, width, num_tokens=29, segments=(0, 1, 2, 4, -1)):
    """Tokens of segments 0, 1, 2, 4 interleaved with padding (-1); segment 3 has no token."""
    context = rng.standard_normal((num_tokens, width)).astype(np.float32)
    segment = rng.choice(segments, num_tokens).astype(np.int32)
    segment[:4] = [0, 1, 2, 4]  # every listed segment present
    return context, segment


@pytest.mark.parametrize("case", sorted(KV_CASES))
def test_matches_hf_per_segment(tmp_path, case):
    cfg, params, otr, twr = convert_case(tmp_path, KV_CASES[case], resampler_config_in_json=case != "kv1")
    assert cfg.resampler.num_kv_heads == int(case[-1])  # read from resampler_config, or from the tensors
    rng = np.random.default_rng(len(case))
    context, segment = packed_example(rng, cfg.resampler.hidden_size)
    module = PerceiverResampler(cfg.resampler)
    run = jax.jit(lambda p, c, s: module.apply({"params": p}, c, s, 5))
    for name, ref_module in (("otr_resampler", otr), ("twr_resampler", twr)):
        ours = np.asarray(run(params[name], context, segment))
        ref = hf_per_segment(ref_module, context, segment, 5, rng)
        assert ours.shape == (5, cfg.resampler.num_latents, cfg.resampler.hidden_size)
        assert rel_err(ours, ref) <= TOL, name
        assert rel_err(ours[3], ref[3]) <= TOL  # the empty segment: latents attend to themselves only


def test_batched_videos_run_side_by_side(kv2):
    """[B, N] inputs with segments numbered per video equal each video run alone."""
    cfg, params, _, _ = kv2
    rng = np.random.default_rng(7)
    module = PerceiverResampler(cfg.resampler)
    a, b = packed_example(rng, 64), packed_example(rng, 64, segments=(0, 1, 2, 3, 4))
    run = jax.jit(lambda c, s: module.apply({"params": params["otr_resampler"]}, c, s, 5))
    batched = run(jnp.stack([a[0], b[0]]), jnp.stack([a[1], b[1]]))
    for i, (context, segment) in enumerate((a, b)):
        alone = run(context, segment)
        assert rel_err(batched[i], alone) <= 1e-5  # float reassociation only


def test_other_segments_get_exactly_zero_weight(kv2):
    cfg, params, _, _ = kv2
    rng = np.random.default_rng(8)
    context, segment = packed_example(rng, 64)
    module = PerceiverResampler(cfg.resampler)
    _, weights = module.apply({"params": params["twr_resampler"]}, context, segment, 5, return_attention=True)
    weights = np.asarray(weights)  # [depth, S, heads, latents, N + latents]
    n = len(segment)
    own = segment[None, :] == np.arange(5)[:, None]  # [S, N]
    on_context = weights[..., :n]
    assert np.all(np.where(own[None, :, None, None, :], 0.0, on_context) == 0.0)  # other segments, padding: 0
    assert np.all(np.where(own[None, :, None, None, :], on_context, 1.0) > 0.0)  # own tokens: > 0
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_permuting_objects_permutes_blocks_and_token_order_does_not_matter(kv2):
    cfg, params, _, _ = kv2
    rng = np.random.default_rng(9)
    context, segment = packed_example(rng, 64)
    module = PerceiverResampler(cfg.resampler)
    run = jax.jit(lambda c, s: module.apply({"params": params["otr_resampler"]}, c, s, 5))
    base = np.asarray(run(context, segment))
    perm = np.array([3, 0, 4, 1, 2])  # object o becomes slot perm[o]
    relabelled = np.where(segment >= 0, perm[segment], -1).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(run(context, relabelled))[perm], base)  # exactly the same numbers
    order = rng.permutation(len(segment))  # the packed order of the tokens
    np.testing.assert_allclose(np.asarray(run(context[order], segment[order])), base, rtol=0, atol=1e-5)

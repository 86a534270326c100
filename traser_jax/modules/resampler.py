"""The Idefics2-style perceiver resampler, run over many segments in one masked attention.

Per layer, as HF's Idefics2PerceiverResampler: the latents (RMSNorm) attend to
[context (RMSNorm); latents] with grouped-query attention (no bias, no positions),
then a residual SiLU-gated MLP; a final RMSNorm. TRASER runs it twice: the OTR with
one segment per object, the TWR with one segment per (object, time window).

Packed form: `context [N, D]` holds the tokens of all segments (any order),
`context_segment [N]` the segment of each token (-1 = padding), and the static
`num_segments S` the number of latent blocks. Latent block s attends to the context
tokens of segment s and to its own latents only; every other key gets exactly zero
weight. A segment with no tokens is allowed: its latents attend only to themselves
(what HF gives with an all-zero context mask). Output `[S, num_latents, D]`. A
leading batch axis (context [B, N, D], context_segment [B, N] -> [B, S, n, D]) runs
the videos of a batch side by side, segments numbered per video.

Cost: the logits are [B, S, heads, num_latents, N] (each block scores every packed
token of its video, masked); no per-segment Python loop and no per-segment padding.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from traser_jax import sharding as sh
from traser_jax.config import ResamplerConfig
from traser_jax.modules.layers import NEG_INF, Dtype, GatedMLP, RMSNorm, dense, normal_init, scanned


def segment_attention(q, k_ctx, v_ctx, k_lat, v_lat, ctx_mask):
    """q [B, S, n, H, d]; k/v_ctx [B, N, KV, d] shared by the segments of a video; k/v_lat [B, S, n, KV, d]
    per segment; ctx_mask [B, S, N] (True = segment s may read token i).
    Returns ([B, S, n, H, d], weights [B, S, H, n, N + n]); logits and softmax in float32."""
    batch, segs, n, heads, dim = q.shape
    kv = k_ctx.shape[-2]
    qg = q.reshape(batch, segs, n, kv, heads // kv, dim)
    scale = dim ** -0.5
    logits_ctx = jnp.einsum("bsqhgd,bkhd->bshgqk", qg, k_ctx, preferred_element_type=jnp.float32) * scale
    logits_ctx = jnp.where(ctx_mask[:, :, None, None, None, :], logits_ctx, NEG_INF)
    logits_lat = jnp.einsum("bsqhgd,bskhd->bshgqk", qg, k_lat, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(jnp.concatenate([logits_ctx, logits_lat], axis=-1), axis=-1)
    num_ctx = k_ctx.shape[1]
    w_ctx, w_lat = weights[..., :num_ctx].astype(v_ctx.dtype), weights[..., num_ctx:].astype(v_lat.dtype)
    out = jnp.einsum("bshgqk,bkhd->bsqhgd", w_ctx, v_ctx) + jnp.einsum("bshgqk,bskhd->bsqhgd", w_lat, v_lat)
    return out.reshape(q.shape), weights.reshape(batch, segs, heads, n, num_ctx + n)


class PerceiverLayer(nn.Module):
    cfg: ResamplerConfig
    dtype: Dtype
    param_dtype: Dtype
    return_attention: bool = False

    @nn.compact
    def __call__(self, latents, context, ctx_mask):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lat = RMSNorm(cfg.rms_norm_eps, name="input_latents_norm", **kw)(latents)
        ctx = RMSNorm(cfg.rms_norm_eps, name="input_context_norm", **kw)(context)
        q_proj = dense((cfg.num_heads, cfg.head_dim), [sh.EMBED], [sh.HEADS, sh.HEAD_DIM], use_bias=False,
                       name="q_proj", **kw)
        k_proj = dense((cfg.num_kv_heads, cfg.head_dim), [sh.EMBED], [sh.KV_HEADS, sh.HEAD_DIM], use_bias=False,
                       name="k_proj", **kw)
        v_proj = dense((cfg.num_kv_heads, cfg.head_dim), [sh.EMBED], [sh.KV_HEADS, sh.HEAD_DIM], use_bias=False,
                       name="v_proj", **kw)
        out, weights = segment_attention(q_proj(lat), k_proj(ctx), v_proj(ctx), k_proj(lat), v_proj(lat), ctx_mask)
        latents = latents + dense(cfg.hidden_size, [sh.HEADS, sh.HEAD_DIM], [sh.EMBED], axis=(-2, -1),
                                  use_bias=False, name="o_proj", **kw)(out)
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(latents)
        latents = latents + GatedMLP(cfg.intermediate_size, sh.EMBED, sh.MLP, name="mlp", **kw)(h)
        latents = nn.with_logical_constraint(latents, (sh.ACT_BATCH, sh.ACT_SEGMENTS, None, sh.ACT_EMBED))
        return latents, (weights if self.return_attention else None)


class PerceiverResampler(nn.Module):
    cfg: ResamplerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    unroll_layers: bool = False

    @nn.compact
    def __call__(self, context: jax.Array, context_segment: jax.Array, num_segments: int,
                 return_attention: bool = False):
        """context [(B,) N, D], context_segment [(B,) N] int (-1 = padding) -> [(B,) num_segments, num_latents, D]
        (and the attention weights [depth, (B,) S, heads, num_latents, N + num_latents] with return_attention)."""
        cfg = self.cfg
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"resampler: num_heads {cfg.num_heads} is not a multiple of num_kv_heads "
                             f"{cfg.num_kv_heads}")
        unbatched = context.ndim == 2
        if unbatched:
            context, context_segment = context[None], context_segment[None]
        if context.ndim != 3 or context.shape[-1] != cfg.hidden_size or context_segment.shape != context.shape[:2]:
            raise ValueError(f"resampler: context {context.shape} must be [(B,) N, {cfg.hidden_size}] and "
                             f"context_segment {context_segment.shape} [(B,) N]")
        latents = self.param("latents", normal_init((sh.LATENTS, sh.EMBED)), (cfg.num_latents, cfg.hidden_size),
                             self.param_dtype)
        latents = jnp.broadcast_to(latents.astype(self.dtype), (context.shape[0], num_segments, *latents.shape))
        ctx_mask = context_segment[:, None, :] == jnp.arange(num_segments, dtype=context_segment.dtype)[:, None]
        context = nn.with_logical_constraint(context.astype(self.dtype), (sh.ACT_BATCH, sh.ACT_TOKENS, sh.ACT_EMBED))
        layers = scanned(PerceiverLayer, cfg.depth, self.remat, in_axes=(nn.broadcast, nn.broadcast),
                         unroll=self.unroll_layers)
        latents, weights = layers(cfg, self.dtype, self.param_dtype, return_attention, name="layers")(
            latents, context, ctx_mask)
        out = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(latents)
        if unbatched:
            out = out[0]
            weights = None if weights is None else weights[:, 0]
        return (out, weights) if return_attention else out

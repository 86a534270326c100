"""The Qwen2.5 decoder (the language model of Qwen2.5-VL) in Flax Linen, with a KV cache.

Grouped-query attention with q/k/v bias, RMSNorm, SwiGLU, rotary embeddings. TRASER
feeds plain 1-D positions (the same id on the three M-RoPE axes); M-RoPE with equal
axes takes every frequency band from the same position, so it is exactly 1-D RoPE
(tests/test_parity_text.py checks this against HF with explicit 3-axis ids).

Decoding: `init_cache(cfg, batch, max_len)` gives an empty cache; calling the decoder
with `cache` and `cache_index` (slots already filled) writes the new keys/values at
`cache_index`, attends to every valid filled slot (causally within the new chunk),
and returns the updated cache. A prefill is the same call on an empty cache with
cache_index 0; a step is a call with one new token. The cache-free call (training)
attends causally over the given sequence.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from traser_jax import sharding as sh
from traser_jax.config import TextConfig
from traser_jax.modules.layers import (Dtype, GatedMLP, RMSNorm, apply_rope, attention, dense, normal_init,
                                       rope_inv_freq, scanned)

Cache = dict[str, jax.Array]  # {"k", "v": [layers, batch, max_len, kv_heads, head_dim], "mask": [batch, max_len]}


def head_dim(cfg: TextConfig) -> int:
    return cfg.hidden_size // cfg.num_heads


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> Cache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, head_dim(cfg))
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "mask": jnp.zeros((batch, max_len), bool)}


def rope_cos_sin(positions: jax.Array, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., T, dim] for integer positions [..., T] (HF layout: the half frequencies twice)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(dim, theta))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str = "einsum"

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv_lengths, layer_cache, cache_index):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hd = head_dim(cfg)
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        q = dense((cfg.num_heads, hd), [sh.EMBED], [sh.HEADS, sh.HEAD_DIM], use_bias=True, name="q_proj", **kw)(h)
        k = dense((cfg.num_kv_heads, hd), [sh.EMBED], [sh.KV_HEADS, sh.HEAD_DIM], use_bias=True, name="k_proj",
                  **kw)(h)
        v = dense((cfg.num_kv_heads, hd), [sh.EMBED], [sh.KV_HEADS, sh.HEAD_DIM], use_bias=True, name="v_proj",
                  **kw)(h)
        q = nn.with_logical_constraint(apply_rope(q, cos, sin), (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_HEADS, None))
        k = apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            ck, cv = layer_cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            new_cache = (k, v)
        out = attention(q, k, v, mask, kv_lengths=kv_lengths, causal=kv_lengths is not None,
                        impl=self.attention_impl)
        x = x + dense(cfg.hidden_size, [sh.HEADS, sh.HEAD_DIM], [sh.EMBED], axis=(-2, -1), use_bias=False,
                      name="o_proj", **kw)(out)
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + GatedMLP(cfg.intermediate_size, sh.EMBED, sh.MLP, name="mlp", **kw)(h)
        x = nn.with_logical_constraint(x, (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))
        return x, new_cache


class TextDecoder(nn.Module):
    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    unroll_layers: bool = False
    attention_impl: str = "einsum"

    def setup(self):
        cfg = self.cfg
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"text: hidden_size {cfg.hidden_size}, num_heads {cfg.num_heads}, num_kv_heads "
                             f"{cfg.num_kv_heads}: need hidden % heads == 0 and heads % kv_heads == 0")
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                     embedding_init=normal_init((sh.VOCAB, sh.EMBED)), name="embed_tokens")
        blocks = scanned(DecoderLayer, cfg.num_layers, self.remat, in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast),
                         unroll=self.unroll_layers)
        self.layers = blocks(cfg, self.dtype, self.param_dtype, self.attention_impl, name="layers")
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, [sh.EMBED], [sh.VOCAB], use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        # Rows of a table whose width FSDP splits would make XLA rematerialize the whole table on every
        # device ("involuntary full rematerialization"); gather the width first, as for any FSDP weight.
        table = nn.with_logical_constraint(self.embed_tokens.embedding, (sh.VOCAB, None))
        return jnp.take(table, input_ids, axis=0).astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] of final hidden states."""
        out = self.embed_tokens.attend(hidden) if self.cfg.tie_word_embeddings else self.lm_head(hidden)
        return nn.with_logical_constraint(out.astype(jnp.float32), (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_VOCAB))

    def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: Cache | None = None, cache_index: jax.Array | int | None = None,
                 return_hidden: bool = False) -> tuple[jax.Array, Cache | None]:
        """embeds [B, S, D], positions [B, S] int, attention_mask [B, S] (1 = real token; without a cache,
        padding is on the right, as `tokens.pad_to` gives).

        Returns (logits [B, S, vocab] float32, or the final hidden states with return_hidden; new cache or None).
        """
        cfg = self.cfg
        batch, length = embeds.shape[:2]
        if positions.shape != (batch, length) or attention_mask.shape != (batch, length):
            raise ValueError(f"positions {positions.shape} and attention_mask {attention_mask.shape} must be "
                             f"{(batch, length)} like embeds {embeds.shape}")
        valid = attention_mask.astype(bool)
        cos, sin = rope_cos_sin(positions, head_dim(cfg), cfg.rope_theta)
        if cache is None:
            causal = jnp.tril(jnp.ones((length, length), bool))
            mask = causal[None] & valid[:, None, :]
            kv_lengths = valid.sum(-1)  # the mask as lengths for the fused kernels: padding is on the right
            layer_cache, new_cache = None, None
        else:
            if cache_index is None:
                raise ValueError("cache_index is required with a cache")
            max_len = cache["mask"].shape[1]
            key_valid = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, cache_index))
            slots = jnp.arange(max_len)
            causal = slots[None, :] <= (cache_index + jnp.arange(length))[:, None]  # [S, max_len]
            mask = causal[None] & key_valid[:, None, :]
            kv_lengths = None
            layer_cache = (cache["k"], cache["v"])
        x = nn.with_logical_constraint(embeds.astype(self.dtype), (sh.ACT_BATCH, sh.ACT_LENGTH, sh.ACT_EMBED))
        x, kv = self.layers(x, cos, sin, mask, kv_lengths, layer_cache, cache_index)
        if cache is not None:
            new_cache = {"k": kv[0], "v": kv[1], "mask": key_valid}
        x = self.norm(x)
        return (x if return_hidden else self.logits(x)), new_cache


def cache_bytes(cfg: TextConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> int:
    """Memory of a KV cache, to size decoding batches."""
    return 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * head_dim(cfg) * jnp.dtype(dtype).itemsize

"""Building blocks shared by the vision tower, the decoder and the resamplers.

Numerics follow the Hugging Face modules they are converted from: RMSNorm in
float32 then cast back, attention logits and softmax in float32, rotary
embeddings computed in float32 with HF's rotate-half layout.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from traser_jax import sharding as sh

Dtype = Any
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")  # `attention(impl=...)`, config key train.attention_impl
INIT_STD = 0.02  # HF initializer_range of Qwen2.5-VL and Idefics2


def dtype_of(name: str) -> Dtype:
    """'float32' / 'bfloat16' / 'float16' as a jnp dtype, with a clear error."""
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: expected float32, bfloat16 or float16") from None


def normal_init(axes: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), tuple(axes))


def zeros_init(axes: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


class Dense(nn.Module):
    """y = x . kernel (+ bias), contracting `axis` of x; kernel [*in, *features], bias [*features].

    nn.DenseGeneral's parameter layout, with the kernel created at its full shape:
    DenseGeneral's flat-then-reshape init re-runs at apply time (a shape check) and
    its boxed reshape trips over the logical activation rules of the train step."""
    features: tuple[int, ...]
    axis: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...]
    use_bias: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axis = tuple(a % x.ndim for a in self.axis)
        kernel = self.param("kernel", normal_init(self.kernel_axes),
                            (*(x.shape[a] for a in axis), *self.features), self.param_dtype)
        bias = (self.param("bias", zeros_init(self.bias_axes), self.features, self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
        return y + bias if bias is not None else y


def dense(features: int | Sequence[int], in_axes: Sequence[str | None], out_axes: Sequence[str | None], *,
          axis: int | Sequence[int] = -1, use_bias: bool, dtype: Dtype, param_dtype: Dtype,
          name: str) -> Dense:
    """A dense layer whose kernel [*in, *out] and bias [*out] carry logical axis names."""
    features = (features,) if isinstance(features, int) else tuple(features)
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return Dense(features=features, axis=axis, kernel_axes=(*in_axes, *out_axes), bias_axes=tuple(out_axes),
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class RMSNorm(nn.Module):
    """x / rms(x) * scale; the normalisation in float32, as HF's Qwen2/Idefics2 RMSNorm."""
    eps: float = 1e-6
    axis_name: str = sh.EMBED
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), as Qwen2MLP / Idefics2MLP (bias for the vision tower)."""
    hidden: int
    embed_axis: str
    mlp_axis: str
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.hidden, [self.embed_axis], [self.mlp_axis], name="gate_proj", **kw)(x)
        up = dense(self.hidden, [self.embed_axis], [self.mlp_axis], name="up_proj", **kw)(x)
        return dense(x.shape[-1], [self.mlp_axis], [self.embed_axis], name="down_proj", **kw)(nn.silu(gate) * up)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [..., T, H, d] by cos/sin [..., T, d] (broadcast over heads), in float32."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
    """HF's inverse frequencies 1 / theta^(2i/dim), i < dim/2, in float32."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


NEG_INF = float(jnp.finfo(jnp.float32).min)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
              kv_lengths: jax.Array | None = None, causal: bool = False,
              return_weights: bool = False, impl: str = "einsum") -> jax.Array | tuple[jax.Array, jax.Array]:
    """Grouped-query softmax attention.

    q [..., Q, H, d], k and v [..., K, KV, d] with H a multiple of KV (query head h
    reads KV head h // (H / KV), as HF's repeat_kv); mask broadcastable to
    [..., Q, K], True = attend. Returns [..., Q, H, d] (and the weights
    [..., H, Q, K] with return_weights). Logits and softmax run in float32; a masked
    key gets exactly zero weight. impl "einsum" materialises the weights; "xla" and
    "cudnn" call jax.nn.dot_product_attention (cudnn: fused on NVIDIA GPUs).

    kv_lengths [...] (with `causal`): the caller's statement that `mask` is exactly "key < its
    length" (right padding), and-ed with "key <= query" when causal. The fused implementations then
    take the lengths and the causal flag instead of a mask tensor, so cuDNN skips the masked
    blocks and reads no bias; einsum always uses `mask`.
    """
    *batch, nq, heads, dim = q.shape
    kv_heads = k.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"attention: {heads} query heads is not a multiple of {kv_heads} KV heads")
    scale = dim ** -0.5
    if impl in ("xla", "cudnn"):
        if return_weights:
            raise ValueError("attention weights need impl='einsum'")
        flat = int(np.prod(batch)) if batch else 1
        q4, k4, v4 = (t.reshape(flat, *t.shape[len(batch):]) for t in (q, k, v))
        if kv_lengths is not None:
            lengths = jnp.broadcast_to(kv_lengths, tuple(batch)).reshape(flat).astype(jnp.int32)
            # Under a vmap (the model's, over videos), cuDNN's batching rule in jax 0.10 reshapes the
            # query and key lengths to the batched queries' row count, and fails on lengths not
            # batched with them: the vision tower's (a constant window layout), and the query lengths
            # jax fills in. A select on a test of q, the same value either way, batches them with q
            # (XLA removes it); every query is valid, as without query lengths.
            head = q4[:, 0, 0, 0]
            batched = functools.partial(jnp.where, head == head)
            out = jax.nn.dot_product_attention(q4, k4, v4, scale=scale, is_causal=causal,
                                               query_seq_lengths=batched(nq, nq).astype(jnp.int32),
                                               key_value_seq_lengths=batched(lengths, lengths),
                                               implementation=impl)
            return out.reshape(q.shape)
        m4 = None
        if mask is not None:
            # cuDNN turns the mask into a bias that must be full-size per head: its vmap rule
            # reshapes it to [batch, heads, Q, K] and fails on a head axis of 1.
            m4 = jnp.broadcast_to(mask, (*batch, nq, k.shape[-3])).reshape(flat, 1, nq, k.shape[-3])
            if impl == "cudnn":
                m4 = jnp.broadcast_to(m4, (flat, heads, nq, k.shape[-3]))
        out = jax.nn.dot_product_attention(q4, k4, v4, mask=m4, scale=scale, implementation=impl)
        return out.reshape(q.shape)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    groups = heads // kv_heads
    qg = q.reshape(*batch, nq, kv_heads, groups, dim)
    logits = jnp.einsum("...qhgd,...khd->...hgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[..., None, None, :, :], logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("...hgqk,...khd->...qhgd", weights.astype(v.dtype), v).reshape(q.shape)
    if return_weights:
        return out, weights.reshape(*batch, heads, nq, k.shape[-3])
    return out


# The forward primitive of jax.nn.dot_product_attention(implementation="cudnn"): its outputs are the
# attention output and the softmax statistics that cuDNN's backward reads.
FUSED_ATTENTION_FORWARD = frozenset({"dot_product_attention_fwd_wrapper"})


def dots_and_fused_attention_saveable(prim, *args, **params) -> bool:
    """dots_saveable, and also keep the fused attention's forward outputs. Under dots_saveable alone the
    backward runs cuDNN's attention forward again for its statistics (a custom call is not a dot): about
    3 % of traser_3b's decoder step on an H100 (BENCHMARKS.md). The cost is one [B, L, heads, head_dim]
    output and [B, heads, L] statistics per layer. Without cudnn it is dots_saveable."""
    return prim.name in FUSED_ATTENTION_FORWARD or jax.checkpoint_policies.dots_saveable(prim, *args, **params)


def remat_policy(name: str) -> Any:
    """cfg.train.remat as a jax.checkpoint policy ('none' means no remat: returns None)."""
    policies = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                "dots_saveable": jax.checkpoint_policies.dots_saveable,
                "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "dots_and_attention_saveable": dots_and_fused_attention_saveable}
    if name not in policies:
        raise ValueError(f"train.remat {name!r}: expected one of {sorted(policies)}")
    return policies[name]


def scanned(block: type[nn.Module], length: int, remat: str, in_axes: tuple, unroll: bool = False) -> type:
    """`block` stacked `length` times with nn.scan (params on a leading 'layers' axis), optionally rematted.

    unroll (train.unroll_layers) emits the `length` layers one after another instead of a loop, with the
    same parameters: no per-layer slices of the weight stacks and no stacked remat residuals, which the
    loop copies on GPU (BENCHMARKS.md), at the price of a longer compile (5 to 7 times for traser_3b's
    decoder)."""
    policy = remat_policy(remat)
    if remat != "none":
        # Inside a loop, the forward and the backward's recompute are different loop bodies; unrolled,
        # they are one program, and XLA would merge the recompute into the forward (keeping everything).
        block = nn.remat(block, prevent_cse=unroll, policy=policy)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=length, unroll=length if unroll else 1,
                   metadata_params={nn.PARTITION_NAME: sh.LAYERS})

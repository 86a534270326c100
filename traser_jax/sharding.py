"""Logical axis names of every TRASER parameter and key activation, and their mesh rules.

The Flax modules (traser_jax/modules/) name each parameter dimension with a logical
axis (`nn.with_logical_partitioning`) and constrain key activations
(`nn.with_logical_constraint`). Rules map logical names to the mesh axes `data`,
`fsdp`, `tensor`; `cfg.mesh.rules` overrides DEFAULT_RULES (same format: a list of
[logical, mesh axis | list of mesh axes | null]). A logical name with no rule, or
mapped to None, is replicated.

Dimensions are named apart where the sizes differ in kind (the vision tower's 1280
width is not the decoder's 2048 `embed`), so a rule can shard one without the
other. Sizes that no mesh axis divides evenly (Qwen2.5-VL-3B: 2 KV heads, vision
MLP 3420) stay replicated in the defaults.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax

# Parameter axes.
LAYERS = "layers"              # stacked (scanned) layer axis
VOCAB = "vocab"
EMBED = "embed"                # decoder and resampler width (2048)
MLP = "mlp"                    # decoder MLP (11008) and resampler MLP (8192)
HEADS = "heads"                # query heads (decoder 16, resampler 16)
KV_HEADS = "kv_heads"          # key/value heads (decoder 2, resampler 4)
HEAD_DIM = "head_dim"
LATENTS = "latents"            # resampler latent rows (32)
VISION_PATCH = "vision_patch"  # flattened patch C*T*P*P (1176)
VISION_EMBED = "vision_embed"  # vision width (1280)
VISION_MLP = "vision_mlp"      # vision MLP (3420)
VISION_HEADS = "vision_heads"  # vision heads (16)
VISION_MERGE_IN = "vision_merge_in"  # merger input: 2x2 patches concatenated (4 x 1280)
VISION_MERGE = "vision_merge"  # merger hidden (4 x 1280)
QKV = "qkv"                    # the 3 of the vision tower's fused qkv projection

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
ACT_TOKENS = "act_tokens"      # packed video tokens (vision patches, resampler context)
ACT_SEGMENTS = "act_segments"  # resampler segments (objects, object windows)
CACHE_LENGTH = "cache_length"

# Mesh axes a batch is split over (activations' ACT_BATCH, the input batch, the per-video vmap).
BATCH_MESH_AXES = ("data", "fsdp")

DEFAULT_RULES: list[tuple[str, Any]] = [
    # parameters: FSDP shards the model width, tensor parallelism the heads and MLP
    (LAYERS, None),
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, None),
    (HEAD_DIM, None),
    (LATENTS, None),
    (VISION_PATCH, None),
    (VISION_EMBED, "fsdp"),
    (VISION_MLP, None),
    (VISION_HEADS, "tensor"),
    (VISION_MERGE_IN, "fsdp"),  # the merger's fc1 (4 x 1280)^2: FSDP alone must split it too
    (VISION_MERGE, "tensor"),
    (QKV, None),
    # activations: the batch over data x fsdp, heads and MLP over tensor
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, None),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (ACT_TOKENS, None),
    (ACT_SEGMENTS, None),
    (CACHE_LENGTH, None),
]

PARAM_AXES = (LAYERS, VOCAB, EMBED, MLP, HEADS, KV_HEADS, HEAD_DIM, LATENTS, VISION_PATCH, VISION_EMBED,
              VISION_MLP, VISION_HEADS, VISION_MERGE_IN, VISION_MERGE, QKV)
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB, ACT_TOKENS,
                   ACT_SEGMENTS, CACHE_LENGTH)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> list[tuple[str, Any]]:
    """cfg.mesh.rules (YAML lists) as Flax logical rules; empty or None gives DEFAULT_RULES."""
    if not rules:
        return list(DEFAULT_RULES)
    out = []
    known = set(PARAM_AXES) | set(ACTIVATION_AXES)
    for i, rule in enumerate(rules):
        if len(rule) != 2:
            raise ValueError(f"mesh.rules[{i}] = {rule!r}: expected [logical_axis, mesh_axis]")
        logical, mesh_axis = rule
        if logical not in known:
            raise ValueError(f"mesh.rules[{i}]: unknown logical axis {logical!r}; known: {sorted(known)}")
        out.append((logical, tuple(mesh_axis) if isinstance(mesh_axis, list) else mesh_axis))
    return out


def logical_shardings(abstract_params: Any, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a (boxed, e.g. from jax.eval_shape(model.init)) parameter tree."""
    specs = nn.get_partition_spec(abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def mesh_axes(abstract_params: Any, rules: Sequence[tuple[str, Any]]) -> Any:
    """The mesh PartitionSpec of every parameter (from its logical names and the rules)."""
    specs = nn.get_partition_spec(abstract_params)
    return jax.tree.map(lambda spec: nn.logical_to_mesh_axes(spec, list(rules)), specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def sharding_problems(abstract_params: Any, rules: Sequence[tuple[str, Any]],
                      mesh_shape: dict[str, int]) -> list[str]:
    """Parameters a mesh cannot shard as the rules say: a dimension not divisible by its mesh axes'
    size, or a mesh axis used twice in one parameter. Empty when all is well."""
    problems = []
    shapes = nn.meta.unbox(abstract_params)
    flat_specs = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        mesh_axes(abstract_params, rules), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        name = jax.tree_util.keystr(path)
        spec = flat_specs[name]
        used = []
        for dim, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            size = 1
            for a in axes:
                size *= mesh_shape.get(a, 1)
            used += axes
            if dim % size:
                problems.append(f"{name}: dimension {dim} is not divisible by {axes} = {size} devices")
        if len(set(used)) != len(used):
            problems.append(f"{name}: mesh axes {used} repeat in {spec}")
    return problems


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """The mesh and logical rules active while tracing, so activation constraints resolve to mesh axes."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> jax.sharding.NamedSharding:
    """An array's leading (batch) axis split over BATCH_MESH_AXES, the rest whole."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_MESH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways BATCH_MESH_AXES split a batch."""
    return math.prod(mesh.shape[a] for a in BATCH_MESH_AXES)

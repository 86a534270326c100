"""Every parameter carries logical axis names, and the default rules shard the published shapes
on the usual meshes without a non-divisible dimension or a mesh axis used twice."""
import flax.linen as nn
import jax
import pytest
from flax import traverse_util

from traser_jax import config as config_lib
from traser_jax import sharding as sh
from traser_jax.model import abstract_params


def test_every_parameter_is_named():
    params = abstract_params(config_lib.load("tiny"))
    for path, leaf in traverse_util.flatten_dict(params).items():
        assert isinstance(leaf, nn.Partitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        assert all(n is None or n in sh.PARAM_AXES for n in leaf.names), (path, leaf.names)


@pytest.mark.parametrize("mesh", [{"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2},
                                  {"data": 1, "fsdp": 4, "tensor": 4}, {"data": 1, "fsdp": 16, "tensor": 8}])
def test_default_rules_shard_traser_3b(mesh):
    params = abstract_params(config_lib.load("traser_3b"))
    assert sh.sharding_problems(params, sh.DEFAULT_RULES, mesh) == []
    specs = traverse_util.flatten_dict(sh.mesh_axes(params, sh.DEFAULT_RULES))
    assert specs[("llm", "layers", "q_proj", "kernel")] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert specs[("llm", "embed_tokens", "embedding")] == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_problems_are_named():
    params = abstract_params(config_lib.load("traser_3b"))
    rules = [(k, "tensor") if k == sh.KV_HEADS else (k, v) for k, v in sh.DEFAULT_RULES]
    problems = sh.sharding_problems(params, rules, {"tensor": 4})
    assert any("k_proj" in p and "dimension 2 is not divisible" in p for p in problems)
    with pytest.raises(ValueError, match=r"mesh.rules\[0\]: unknown logical axis 'embedd'"):
        sh.rules_from_config([["embedd", "fsdp"]])
    assert sh.rules_from_config([["embed", ["fsdp", "data"]]]) == [("embed", ("fsdp", "data"))]

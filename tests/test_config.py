"""Config presets and key=value overrides fail loudly on anything unknown."""
import pytest

from traser_jax import config


def test_presets_load():
    preset = config.load("traser_3b")
    assert preset.text.num_layers == 36 and preset.train.unroll_layers  # the layer loops written out
    tiny = config.load("tiny")
    assert tiny.vision.fullatt_block_indexes == [1, 3] and tiny.text.hidden_size == 64


def test_overrides_are_typed():
    cfg = config.load("tiny", ["optim.lr_llm=3e-4", "mesh.data=2", "train.async_checkpointing=false",
                               "vision.fullatt_block_indexes=[0, 2]", "tokens.window_seconds=8"])
    assert cfg.optim.lr_llm == 3e-4 and cfg.mesh.data == 2 and cfg.train.async_checkpointing is False
    assert cfg.vision.fullatt_block_indexes == [0, 2] and cfg.tokens.window_seconds == 8.0


def test_unknown_key_lists_closest():
    with pytest.raises(config.ConfigError, match=r"unknown config key 'optim.lr_lm'.*optim.lr_llm"):
        config.load("tiny", ["optim.lr_lm=1"])


@pytest.mark.parametrize("item, message", [
    ("mesh.data=two", r"'mesh.data': cannot read 'two' as int"),
    ("mesh.data=1.5", r"cannot read 1.5 as int"),
    ("train.async_checkpointing=3", r"cannot read 3 as bool"),
    ("no_equals_sign", r"is not key=value"),
])
def test_bad_values(item, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load("tiny", [item])


def test_missing_preset():
    with pytest.raises(config.ConfigError, match="no config preset 'nope'"):
        config.load("nope")

"""The object resampler's pretraining (traser_jax.pretrain_objects): the tokens it reads are the ones training
gives the OTR, it learns, and its checkpoint differs from its input in the OTR alone."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from data_gen.shards import ShardReader
from traser_jax import config as config_lib
from traser_jax import pretrain_objects
from traser_jax import tokens as tokens_lib
from traser_jax.convert import save_checkpoint
from traser_jax.data import video_features
from traser_jax.model import Traser, init_params
from traser_jax.train import load_init_params
from train_fixtures import write_toyworld

OVERRIDES = ["tokens.frame_size=[112,112]", "train.compute_dtype=float32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_objects")
    shards = write_toyworld(root / "data", num_videos=4)
    cfg = config_lib.load("tiny", OVERRIDES)
    params = init_params(cfg, jax.random.key(1))
    save_checkpoint(root / "init", cfg, params)
    return cfg, shards, root / "init", params


def test_object_tokens_are_the_towers_tokens_token_selection_picks(setup):
    cfg, shards, _, params = setup
    tokens, mask, labels = pretrain_objects.object_tokens(shards, cfg, params["vision"], progress=False)
    model = Traser(cfg)
    row = 0
    for example in ShardReader(shards):
        pixel_values, grid = video_features(example.record, example.frames, cfg)
        video = np.asarray(model.apply({"params": params}, jnp.asarray(pixel_values), (tuple(int(g) for g in grid),),
                                       method=Traser.encode_video))
        selection = tokens_lib.select_from_record(example.record, cfg.vision, cfg.tokens)
        by_id = {o.id: o for o in example.record.objects}
        for object_id, index in zip(selection.object_ids, selection.object_tokens):
            if not len(index):
                continue
            assert int(mask[row].sum()) == len(index) and not mask[row, len(index):].any()
            np.testing.assert_allclose(tokens[row, :len(index)], video[index], rtol=1e-5, atol=1e-6)
            assert not tokens[row, len(index):].any()
            assert labels[row] == (by_id[int(object_id)].name, list(by_id[int(object_id)].attributes))
            row += 1
    assert row == len(labels) == len(tokens) > 4


def test_pretraining_lowers_the_loss_and_changes_the_otr_alone(setup, tmp_path):
    cfg, shards, init, params = setup
    out = tmp_path / "objects"
    report = pretrain_objects.pretrain(cfg, init, shards, out, eval_dir=shards, steps=30, batch=16, lr=3e-3,
                                       progress=False)
    assert report["final_loss"] < 0.7 * report["first_loss"]
    assert json.loads((out / pretrain_objects.REPORT_NAME).read_text())["final_loss"] == report["final_loss"]
    assert report["train"] == report["eval"]  # the same objects, scored the same way
    for split in ("train", "eval"):
        assert 0.0 <= report[split]["name_accuracy"] <= 1.0 and 0.0 <= report[split]["attribute_recall"] <= 1.0

    start = config_lib.load("tiny", OVERRIDES + [f"train.init_from={out}", "optim.lr_vision=0"])
    loaded = traverse_util.flatten_dict(jax.device_get(load_init_params(start)))
    before = traverse_util.flatten_dict(jax.device_get(params))
    assert loaded.keys() == before.keys()
    changed = {k for k in before if not np.array_equal(loaded[k], before[k])}
    assert changed and all(k[0] == "otr_resampler" for k in changed)
    assert ("otr_resampler", "latents") in changed


def test_cli_refuses_a_missing_checkpoint_and_no_steps(setup, tmp_path, capsys):
    _, shards, init, _ = setup
    base = ["tiny", "--data", str(shards), "--out", str(tmp_path / "out"), *OVERRIDES]
    assert pretrain_objects.main(base + ["--init", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert pretrain_objects.main(base + ["--init", str(init), "--steps", "0"]) == 2
    assert "steps 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""The vision-tower pretraining stage (traser_jax.pretrain_vision): what the crops hold, and that its
checkpoint is one a training run starts from."""
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from data_gen import rle as rle_lib
from data_gen.shards import ShardReader
from traser_jax import config as config_lib
from traser_jax import pretrain_vision
from traser_jax.model import init_params
from traser_jax.train import load_init_params
from traser_jax.video_input import normalize, patchify, resize_frames
from train_fixtures import write_toyworld

FRAME = 112  # the resized frame side in these tests; crops of 56 px are 2 x 2 merged cells
OVERRIDES = [f"tokens.frame_size=[{FRAME},{FRAME}]", "train.compute_dtype=float32"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toyworld(tmp_path_factory.mktemp("pretrain") / "data", num_videos=4)


def test_crops_hold_their_object_and_its_labels(shards):
    """One crop per object and temporal patch whose first frame shows it; the crop's pixels are the
    tower's input cut at its box, the box holds the object's centroid (shifted by at most `jitter`, an
    eighth of the crop here, unless clipped at the frame's edge), and the labels are the record's."""
    cfg = config_lib.load("tiny", OVERRIDES)
    jitter = 0.125
    crops, names, attributes = pretrain_vision.object_crops(shards, cfg, 56, np.random.default_rng(0), jitter=jitter)
    reader = ShardReader(shards)
    expected = 0
    for i in range(len(reader)):
        for obj in reader[i].record.objects:
            expected += sum(rle_lib.area(obj.masks[t]) > 0 for t in range(0, len(obj.masks), 2))
    assert len(crops.names) == len(crops.boxes) == len(crops.attributes) == expected > 8
    assert names == sorted({o.name for i in range(len(reader)) for o in reader[i].record.objects})

    for n in range(0, expected, 5):
        video, t, y0, x0 = (int(v) for v in crops.boxes[n])
        ex = reader[video]
        frames = normalize(resize_frames(np.asarray(ex.frames), FRAME, FRAME))
        frames = np.concatenate([frames, frames[-1:]]) if len(frames) % 2 else frames
        window = frames[t:t + 2, :, y0:y0 + 56, x0:x0 + 56]
        np.testing.assert_array_equal(crops.pixel_values[n], patchify(window, 14, 2, 2)[0])
        # which object: the one whose name and attributes the labels give, visible in frame t
        objs = [o for o in ex.record.objects if rle_lib.area(o.masks[t]) > 0 and names.index(o.name) == crops.names[n]
                and sorted(o.attributes) == sorted(a for a, on in zip(attributes, crops.attributes[n]) if on)]
        assert objs, (video, t, crops.names[n])
        height, width = np.asarray(ex.frames).shape[1:3]
        ys, xs = np.nonzero(rle_lib.decode(objs[0].masks[t]))
        cy, cx = (ys.mean() + 0.5) * FRAME / height, (xs.mean() + 0.5) * FRAME / width
        for c, lo in ((cy, y0), (cx, x0)):
            assert lo <= c <= lo + 56 or lo in (0, FRAME - 56)
            assert abs(lo + 28 - c) <= jitter * 56 + 1 or lo in (0, FRAME - 56)


def test_pretraining_lowers_the_loss_and_writes_a_checkpoint_training_starts_from(shards, tmp_path):
    cfg = config_lib.load("tiny", OVERRIDES)
    out = tmp_path / "vision"
    report = pretrain_vision.pretrain(cfg, shards, out, eval_dir=shards, steps=40, batch=32, lr=3e-3, center=True,
                                      progress=False)
    assert report["final_loss"] < report["first_loss"]
    assert report["centered"]["videos"] == 4 and report["centered"]["removed_mean_rms"] > 0
    assert json.loads((out / pretrain_vision.REPORT_NAME).read_text())["final_loss"] == report["final_loss"]
    for split in ("train", "eval"):
        assert 0.0 <= report[split]["name_accuracy"] <= 1.0 and 0.0 <= report[split]["attribute_recall"] <= 1.0

    start = config_lib.load("tiny", OVERRIDES + [f"train.init_from={out}", "optim.lr_vision=0"])
    loaded = traverse_util.flatten_dict(jax.device_get(load_init_params(start)))
    fresh = traverse_util.flatten_dict(jax.device_get(init_params(cfg, jax.random.key(0))))
    assert loaded.keys() == fresh.keys()
    trained = [k for k in fresh if not np.array_equal(loaded[k], fresh[k])]
    assert trained and all(k[0] == "vision" for k in trained)  # the tower learned; the rest is fresh init
    assert ("vision", "patch_embed") in trained
    # the tower alone (tower.npz): the checkpoint's tower in float16
    tower = traverse_util.flatten_dict(pretrain_vision.load_tower(out / pretrain_vision.TOWER_NAME, cfg))
    assert tower.keys() == {k[1:] for k in fresh if k[0] == "vision"}
    for key, value in tower.items():
        np.testing.assert_allclose(value, loaded[("vision", *key)], rtol=1e-3, atol=1e-6)


def test_object_windows_are_the_frames_windows_and_training_on_them_starts_from_a_saved_tower(shards, tmp_path):
    """object_windows: the tower on an object's windows gives, at its selected cells, the tokens the tower
    gives there on the whole video (windows alone, no full-attention block); --windows --init-tower trains
    from the saved tower on them."""
    from traser_jax import tokens as tokens_lib
    from traser_jax.data import video_features

    overrides = [*OVERRIDES, "vision.fullatt_block_indexes=[]", "tokens.coverage_threshold=0.01"]
    cfg = config_lib.load("tiny", overrides)
    windows, names, attributes = pretrain_vision.object_windows(shards, cfg, progress=False)
    vision = jax.device_get(init_params(cfg, jax.random.key(2))["vision"])
    encode = pretrain_vision.tower_encoder(cfg)
    example = ShardReader(shards)[0]
    pixel_values, grid = video_features(example.record, example.frames, cfg)
    video = np.asarray(encode(vision, pixel_values, tuple(int(g) for g in grid)))
    selection = tokens_lib.select_from_record(example.record, cfg.vision, cfg.tokens)
    # the first video's first object, first temporal patch it is in: row 0
    first = selection.object_tokens[0]
    grid_h, grid_w = int(grid[1]) // 2, int(grid[2]) // 2
    at_t = first[first // (grid_h * grid_w) == first.min() // (grid_h * grid_w)]
    from_windows = []
    for j in range(windows.cells.shape[1]):
        if windows.cells[0, j].any():
            out = np.asarray(encode(vision, windows.pixel_values[0, j].astype(np.float32), (1, 4, 4)))
            from_windows.extend(out[windows.cells[0, j]])
    from_windows = np.stack(from_windows)
    assert len(from_windows) == len(at_t)
    # the same set of token vectors (windows visit the cells in another order)
    for row in video[at_t]:
        assert np.abs(from_windows - row).max(-1).min() < 1e-2 * np.abs(row).max()  # float16 pixels
    obj = next(o for o in example.record.objects if o.id == selection.object_ids[0])
    assert names[windows.names[0]] == obj.name

    tower = tmp_path / "start.npz"
    pretrain_vision.save_tower(tower, vision, {})
    out = tmp_path / "windows"
    argv = ["tiny", "--data", str(shards), "--eval-data", str(shards), "--out", str(out), "--windows",
            "--init-tower", str(tower), "--steps", "10", "--batch", "8", *overrides]
    assert pretrain_vision.main(argv) == 0
    report = json.loads((out / pretrain_vision.REPORT_NAME).read_text())
    assert report["windows"] and report["train_windows"] == len(windows.names) == report["eval_windows"]
    assert report["init_tower"] == str(tower) and np.isfinite(report["final_loss"])
    assert pretrain_vision.main(["tiny", "--data", str(shards), "--out", str(out), "--windows", *OVERRIDES]) == 2


def test_centering_folds_the_tokens_mean_over_the_videos_into_the_merger(shards):
    """center_tower: each video's tokens are the uncentered tower's minus one vector, the mean of all of
    them over the videos, so their mean is zero."""
    from traser_jax.data import video_features

    cfg = config_lib.load("tiny", OVERRIDES)
    vision = jax.device_get(init_params(cfg, jax.random.key(1))["vision"])
    centered, info = pretrain_vision.center_tower(cfg, vision, shards, videos=3)
    assert info["videos"] == 3
    encode = pretrain_vision.tower_encoder(cfg)
    before, after = [], []
    for example in list(ShardReader(shards))[:3]:
        pixel_values, grid = video_features(example.record, example.frames, cfg)
        grid = tuple(int(g) for g in grid)
        before.append(np.asarray(encode(vision, pixel_values, grid), np.float64))
        after.append(np.asarray(encode(centered, pixel_values, grid), np.float64))
    before, after = np.concatenate(before), np.concatenate(after)
    mean = before.mean(0)
    assert np.sqrt((mean ** 2).mean()) == pytest.approx(info["removed_mean_rms"], rel=1e-4) and info["removed_mean_rms"] > 0
    np.testing.assert_allclose(after, before - mean, rtol=0, atol=1e-5 * np.abs(before).max())
    assert np.abs(after.mean(0)).max() < 1e-5 * np.abs(before).max()


def test_a_saved_tower_starts_a_checkpoint_and_must_fit_the_config(tmp_path, capsys):
    """--from-tower: the checkpoint `pretrain` would write with that tower (fresh init elsewhere, seed 0) and
    the tower's report; a tower of other vision.* settings is refused, naming the parameter."""
    cfg = config_lib.load("tiny", OVERRIDES)
    vision = jax.device_get(init_params(cfg, jax.random.key(3))["vision"])
    tower = tmp_path / "tower.npz"
    pretrain_vision.save_tower(tower, vision, {"eval": {"name_accuracy": 0.5}})
    out = tmp_path / "vision"
    assert pretrain_vision.main(["tiny", "--from-tower", str(tower), "--out", str(out), *OVERRIDES]) == 0
    report = json.loads((out / pretrain_vision.REPORT_NAME).read_text())
    assert report["from_tower"] == str(tower) and report["eval"]["name_accuracy"] == 0.5

    start = config_lib.load("tiny", OVERRIDES + [f"train.init_from={out}"])
    loaded = traverse_util.flatten_dict(jax.device_get(load_init_params(start)))
    fresh = traverse_util.flatten_dict(jax.device_get(init_params(cfg, jax.random.key(0))))
    want = traverse_util.flatten_dict(vision)
    for key, value in loaded.items():
        if key[0] == "vision":
            np.testing.assert_allclose(value, want[key[1:]], rtol=1e-3, atol=1e-6)  # float16 on disk
        else:
            np.testing.assert_array_equal(value, fresh[key])

    other = ["vision.hidden_size=64", "vision.num_heads=2"]
    assert pretrain_vision.main(["tiny", "--from-tower", str(tower), "--out", str(tmp_path / "w"), *OVERRIDES,
                                 *other]) == 2
    assert "has shape" in capsys.readouterr().err
    assert not (tmp_path / "w" / pretrain_vision.REPORT_NAME).exists()


def test_the_committed_demo_tower_fits_the_demo_config():
    """configs/demo_tower.npz (`make demo-tower`) is the demo config's tower: make demo starts from it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = config_lib.load("demo")
    tower = pretrain_vision.load_tower(root / "configs" / "demo_tower.npz", cfg)
    report = json.loads((root / "configs" / "demo_tower.json").read_text())
    assert report["windows"] and report["centered"]["videos"] == 256 and report["eval"]["name_accuracy"] > 0.6
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(tower))


def test_cli_refuses_a_crop_off_the_merged_grid_and_a_jitter_past_half_a_crop(shards, tmp_path, capsys):
    argv = ["tiny", "--data", str(shards), "--out", str(tmp_path / "v"), "--crop", "50", *OVERRIDES]
    assert pretrain_vision.main(argv) == 2
    assert "multiple of patch_size x spatial_merge_size = 28" in capsys.readouterr().err
    argv = ["tiny", "--data", str(shards), "--out", str(tmp_path / "v"), "--jitter", "0.6", *OVERRIDES]
    assert pretrain_vision.main(argv) == 2
    assert "jitter 0.6 must lie in [0, 0.5]" in capsys.readouterr().err


@pytest.mark.slow  # 40 s; the demo trains on the catalog only in `make demo-tower`
def test_catalog_crops_alone_or_with_the_shards_train_the_tower(shards, tmp_path):
    """--catalog: the toyworld object catalog's crops, cut and patchified as the shards' are, labelled in
    toyworld's vocabularies; alone or added to the shards' crops."""
    from data_gen.toyworld import COLORS, SHAPES, SIZES, TEXTURES, ToyworldConfig
    from data_gen.toyworld.catalog import catalog_crop

    cfg = config_lib.load("tiny", OVERRIDES)
    names, attributes = sorted(SHAPES), sorted([*COLORS, *SIZES, *TEXTURES])
    crops = pretrain_vision.catalog_crops(cfg, 56, 12, 5, 0.125, names, attributes, {"max_side": 280})
    assert 0 < len(crops.names) <= 12 and (crops.boxes == -1).all()
    items = [catalog_crop(5, i, 56, (FRAME, FRAME), 0.125, config=ToyworldConfig.from_knobs(max_side=280))
             for i in range(12)]
    items = [item for item in items if item.mask.any()]
    assert len(items) == len(crops.names)
    for n, item in enumerate(items):
        np.testing.assert_array_equal(crops.pixel_values[n], patchify(normalize(resize_frames(item.frames, 56, 56)),
                                                                      14, 2, 2)[0])
        assert names[crops.names[n]] == item.name
        assert sorted(a for a, on in zip(attributes, crops.attributes[n]) if on) == sorted(item.attributes)

    alone = pretrain_vision.pretrain(cfg, None, tmp_path / "alone", steps=2, batch=8, catalog=12,
                                     knobs={"max_side": 280}, progress=False)
    assert alone["names"] == names and alone["train_crops"] == len(items) and alone["catalog_crops"] == 12
    both = pretrain_vision.pretrain(cfg, shards, tmp_path / "both", eval_dir=shards, steps=2, batch=8, catalog=12,
                                    knobs={"max_side": 280}, progress=False)
    shard_crops = pretrain_vision.object_crops(shards, cfg, 56, np.random.default_rng(0))[0]
    assert both["train_crops"] == len(shard_crops.names) + len(items) and both["names"] == names


def test_catalog_crops_made_in_worker_processes_are_the_same_crops_in_the_same_order(monkeypatch):
    """catalog_crops hands chunks of the catalog to `data.worker_count` grain processes; the crops and
    labels equal those made in this process, in index order."""
    from data_gen.toyworld import COLORS, SHAPES, SIZES, TEXTURES

    monkeypatch.setattr(pretrain_vision, "CATALOG_CHUNK", 4)  # 11 crops: three chunks, the last short
    names, attributes = sorted(SHAPES), sorted([*COLORS, *SIZES, *TEXTURES])
    made = [pretrain_vision.catalog_crops(config_lib.load("tiny", [*OVERRIDES, f"data.worker_count={workers}"]), 56,
                                          11, 7, 0.125, names, attributes, {"max_side": 280}) for workers in (0, 2)]
    assert 0 < len(made[0].names) <= 11
    for field in ("pixel_values", "names", "attributes", "boxes"):
        np.testing.assert_array_equal(getattr(made[0], field), getattr(made[1], field))


def test_cli_refuses_no_crops_and_a_bad_knob(tmp_path, capsys):
    out = ["--out", str(tmp_path / "v"), *OVERRIDES]
    assert pretrain_vision.main(["tiny", *out]) == 2
    assert "nothing to train on" in capsys.readouterr().err
    assert pretrain_vision.main(["tiny", "--catalog", "4", "--knob", "max_side", *out]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert pretrain_vision.main(["tiny", "--catalog", "4", "--knob", "sides=3", *out]) == 2
    assert "unknown toyworld knob 'sides'" in capsys.readouterr().err

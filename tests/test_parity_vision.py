"""The Flax vision tower equals transformers' Qwen2.5-VL vision tower (float32, random weights).

Inputs come from transformers' own Qwen2VLVideoProcessor, so the patch layout, the
temporal padding of an odd frame count (the last frame repeated) and non-square
frames are the processor's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity_helpers import FLOAT32, TOL, build_qwen, build_resampler, rel_err, save_traser_dir, tiny_config
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.vision_utils import get_vision_window_index

from traser_jax import convert
from traser_jax.modules.vision import VisionTower, vision_layout


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cfg = tiny_config()
    qwen = build_qwen(cfg, seed=3)
    hf_dir = save_traser_dir(tmp_path_factory.mktemp("hf"), qwen, build_resampler(cfg, 1), build_resampler(cfg, 2))
    cfg, params = convert.from_hf(hf_dir, tmp_path_factory.mktemp("ckpt"), preset="tiny", overrides=FLOAT32,
                                  progress=False)
    return cfg, params, qwen


def processor_inputs(frames_list, patch_size=14, merge_size=2):
    processor = Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 200_000},
                                      cap_pixels_per_frame=False, patch_size=patch_size, merge_size=merge_size)
    videos = [torch.from_numpy(f).permute(0, 3, 1, 2) for f in frames_list]
    out = processor(videos=videos, return_tensors="pt", do_sample_frames=False)
    return out["pixel_values_videos"], out["video_grid_thw"]


def run_both(cfg, params, qwen, pixel_values, grid_thw, impl="einsum"):
    grids = tuple(tuple(int(v) for v in g) for g in grid_thw.tolist())
    tower = VisionTower(cfg.vision, attention_impl=impl)
    ours = jax.jit(lambda p, x: tower.apply({"params": p}, x, grids))(params["vision"],
                                                                       jnp.asarray(pixel_values.numpy()))
    with torch.no_grad():
        ref = qwen.model.visual(pixel_values, grid_thw=grid_thw).pooler_output
    return np.asarray(ours), ref


def test_odd_frames_non_square(converted):
    cfg, params, qwen = converted
    rng = np.random.default_rng(11)
    frames = rng.integers(0, 256, (5, 84, 140, 3), dtype=np.uint8)  # 5 frames -> 3 temporal grids (padded)
    pixel_values, grid_thw = processor_inputs([frames])
    assert grid_thw.tolist() == [[3, 6, 10]]  # 3 x 5 merged cells: windows of 2 x 2 cells, ragged at the edges
    np.testing.assert_array_equal(pixel_values.reshape(3, 60, 3, 2, 14, 14)[2, :, :, 0],
                                  pixel_values.reshape(3, 60, 3, 2, 14, 14)[2, :, :, 1])  # repeated last frame
    ours, ref = run_both(cfg, params, qwen, pixel_values, grid_thw)
    assert ours.shape == (3 * 3 * 5, cfg.vision.out_hidden_size)
    assert rel_err(ours, ref) <= TOL


def test_two_videos_in_one_call(converted):
    """Several videos packed in one call (grids of different sizes), as a batch runs the tower."""
    cfg, params, qwen = converted
    rng = np.random.default_rng(12)
    a = rng.integers(0, 256, (4, 112, 56, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 56, 168, 3), dtype=np.uint8)
    pixel_values, grid_thw = processor_inputs([a, b])
    assert grid_thw.tolist() == [[2, 8, 4], [1, 4, 12]]
    ours, ref = run_both(cfg, params, qwen, pixel_values, grid_thw)
    assert rel_err(ours, ref) <= TOL


def test_dot_product_attention_path(converted):
    """attention_impl='xla' (jax.nn.dot_product_attention; 'cudnn' on GPUs) gives the same tokens."""
    cfg, params, qwen = converted
    rng = np.random.default_rng(13)
    pixel_values, grid_thw = processor_inputs([rng.integers(0, 256, (2, 84, 84, 3), dtype=np.uint8)])
    ours, ref = run_both(cfg, params, qwen, pixel_values, grid_thw, impl="xla")
    assert rel_err(ours, ref) <= TOL


def test_small_patches_merged_four_by_four(tmp_path):
    """7-px patches merged 4 x 4 (the merged cell stays 28 px, as the demo's probes use them): the
    tower, its windows and its merger equal transformers' with the same config, and the model builds."""
    from traser_jax.model import init_params

    cfg = tiny_config("vision.patch_size=7", "vision.spatial_merge_size=4")
    qwen = build_qwen(cfg, seed=5)
    hf_dir = save_traser_dir(tmp_path / "hf", qwen, build_resampler(cfg, 1), build_resampler(cfg, 2))
    cfg, params = convert.from_hf(hf_dir, tmp_path / "ckpt", preset="tiny", overrides=FLOAT32, progress=False)
    assert (cfg.vision.patch_size, cfg.vision.spatial_merge_size) == (7, 4)
    frames = np.random.default_rng(13).integers(0, 256, (4, 84, 140, 3), dtype=np.uint8)
    pixel_values, grid_thw = processor_inputs([frames], patch_size=7, merge_size=4)
    assert grid_thw.tolist() == [[2, 12, 20]] and pixel_values.shape[-1] == 3 * 2 * 7 * 7
    ours, ref = run_both(cfg, params, qwen, pixel_values, grid_thw)
    assert ours.shape == (2 * 3 * 5, cfg.vision.out_hidden_size)
    assert rel_err(ours, ref) <= TOL
    assert jax.tree.structure(init_params(cfg, jax.random.key(0))) == jax.tree.structure(params)


@pytest.mark.parametrize("grids", [((3, 6, 10),), ((2, 8, 4), (1, 4, 12)), ((1, 16, 16), (2, 4, 4))])
def test_window_order_matches_hf(grids):
    """The static window plan is HF's permutation (window size 112 px = 4 merged cells here)."""
    layout = vision_layout(grids, 2, 112, 14)
    index, cu = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=112, patch_size=14)
    np.testing.assert_array_equal(layout.window_index, index.numpy())
    lengths = np.diff(cu.numpy())
    assert sorted((layout.window_groups >= 0).sum(1).tolist()) == sorted(lengths.tolist())
    np.testing.assert_array_equal(layout.window_index[layout.reverse_index], np.arange(len(index)))


def test_bad_inputs_name_the_problem():
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"grid 0 = \(1, 5, 4\)"):
        vision_layout(((1, 5, 4),), 2, 56, 14)
    tower = VisionTower(cfg.vision)
    with pytest.raises(ValueError, match=r"pixel_values shape \(3, 1176\)"):
        jax.eval_shape(lambda: tower.init(jax.random.key(0), jnp.zeros((3, 1176)), ((1, 2, 2),)))

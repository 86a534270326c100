"""The full Flax TRASER forward equals the PyTorch reference (traser_jax.torch_reference:
transformers' Qwen2.5-VL + two Idefics2 resamplers) on a toyworld video with its masks, and
the invariances that make object trajectories separable.

The video (11 frames: temporal padding; 140 x 196: non-square, ragged windows) carries the
toyworld objects plus synthetic ones: a tiny object (no token reaches the threshold: the
single best token is kept), an object seen only at the start and the end (its middle window
has no token and is skipped), and enough small objects to pass the 40-object cap.
"""
import copy

import jax
import numpy as np
import pytest
import torch
from parity_helpers import FLOAT32, TOL, randomize_, rel_err

from data_gen import rle
from data_gen.toyworld.generate import generate_video
from traser_jax import config as config_lib
from traser_jax import convert
from traser_jax import tokens as tk
from traser_jax import video_input
from traser_jax.model import Traser, check_shapes
from traser_jax.torch_reference import TraserReference

BUCKETS = ["tokens.bucket_selected=[512, 1024]", "tokens.bucket_length=[1024, 4096]",
           "tokens.bucket_objects=[48]", "tokens.bucket_windows=[128]"]


def token_fn(text):
    return [ord(c) % 480 for c in text]  # ids below the tiny vocabulary's special ids (500+)


def video_and_masks():
    record, frames = generate_video(2, 0, min_objects=3, max_objects=3, min_duration=11, max_duration=11,
                                    fps_choices=(1,), min_side=112, max_side=196, side_step=28)
    masks = [np.stack([rle.decode(m) for m in o.masks]) for o in record.objects]
    t, h, w = frames.shape[:3]
    tiny = np.zeros((t, h, w), np.uint8)
    tiny[:, 30:36, 40:46] = 1  # 36 px in a 784 px cell: below every threshold
    ends = np.zeros((t, h, w), np.uint8)
    ends[:2, 0:56, 0:56] = ends[-2:, 0:56, 0:56] = 1  # frames 0-1, 9-10: grids 0, 4, 5 (windows 0 and 2)
    extras = []
    for i in range(40):  # small squares, each on a few frames
        m = np.zeros((t, h, w), np.uint8)
        r, c, f = (i * 7) % (h - 28), (i * 23) % (w - 28), i % (t - 2)
        m[f:f + 2, r:r + 28, c:c + 28] = 1
        extras.append(m)
    masks = np.stack([*masks, tiny, ends, *extras])
    assert masks.shape[0] > 40 and frames.shape == (11, 140, 196, 3)
    return frames, masks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = config_lib.load("tiny", [*FLOAT32, *BUCKETS])
    torch.manual_seed(0)
    reference = randomize_(TraserReference.from_config(cfg), seed=41).eval()
    hf_dir = tmp_path_factory.mktemp("traser_hf")
    reference.save_pretrained(hf_dir)  # transformers >= 5 names, resampler_config in config.json
    cfg, params = convert.from_hf(hf_dir, tmp_path_factory.mktemp("ckpt"), preset="tiny",
                                  overrides=[*FLOAT32, *BUCKETS], progress=False)
    frames, masks = video_and_masks()
    patches = video_input.preprocess_video(frames, cfg.vision, cfg.tokens)
    model = Traser(cfg)

    @jax.jit
    def run(params, pixel_values, arrays):
        statics = dict(grid_thw=(patches.grid_thw,), num_objects=arrays["object_ids"].shape[-1],
                       num_windows=arrays["window_object"].shape[-1])
        args = {k: arrays[k] for k in ("sel_token", "otr_segment", "twr_segment", "input_ids", "latent_index",
                                       "positions", "attention_mask")}
        variables = {"params": params}
        logits = model.apply(variables, pixel_values, **statics, **args)
        video = model.apply(variables, pixel_values, statics["grid_thw"], method=Traser.encode_video)
        rows, weights = model.apply(variables, video, args["sel_token"], args["otr_segment"], args["twr_segment"],
                                    statics["num_objects"], statics["num_windows"], return_attention=True,
                                    method=Traser.resample)
        return logits, video, rows, weights

    return cfg, params, reference, frames, masks, patches, run


def inputs_for(cfg, masks, patches, frames):
    grid = tk.token_grid(frames.shape[0], frames.shape[1], frames.shape[2], cfg.vision, cfg.tokens)
    selection = tk.select_from_masks(masks, grid, cfg.tokens, seconds_per_frame=1.0)
    prefix, suffix = tk.chat_texts()
    x = tk.arrange(selection, token_fn, cfg.tokens, cfg.resampler.num_latents, token_fn(prefix), token_fn(suffix))
    assert int(x.num_vision_tokens) == patches.num_merged_tokens
    return x, tk.pad_to_buckets(x, cfg.tokens)


def test_full_forward_matches_reference(setup):
    cfg, params, reference, frames, masks, patches, run = setup
    x, padded = inputs_for(cfg, masks, patches, frames)
    with torch.no_grad():
        ref = reference.forward(frames, masks, token_fn, seconds_per_frame=1.0)
    assert ref.arrangement.input_ids == x.input_ids.tolist()  # same sequence as the reference's own loop
    k, w, n, length = int(x.num_objects), int(x.num_windows), cfg.resampler.num_latents, int(x.length)
    assert k == 40 and w > k  # the cap applied; several windows per object
    assert ref.grid_thw.tolist() == [list(patches.grid_thw)] == [[6, 10, 14]]
    np.testing.assert_allclose(patches.pixel_values, ref.pixel_values.numpy(), rtol=0, atol=1e-5)

    logits, video, rows, _ = run(params, patches.pixel_values, padded.arrays())
    assert rel_err(video, ref.vision) <= TOL
    k_pad = padded.object_ids.shape[-1]
    rows = np.asarray(rows)[0]
    assert rel_err(rows[:k * n].reshape(k, n, -1), ref.otr) <= TOL
    assert rel_err(rows[k_pad * n:(k_pad + w) * n].reshape(w, n, -1), ref.twr) <= TOL
    assert rel_err(np.asarray(logits)[0, :length], ref.logits) <= TOL


def test_other_objects_get_exactly_zero_attention(setup):
    cfg, params, _, frames, masks, patches, run = setup
    _, padded = inputs_for(cfg, masks, patches, frames)
    _, _, _, weights = run(params, patches.pixel_values, padded.arrays())
    num_tokens = padded.sel_token.shape[-1]
    for name, segment in (("otr", padded.otr_segment), ("twr", padded.twr_segment)):
        w = np.asarray(weights[name])[:, 0, ..., :num_tokens]  # [depth, S, heads, latents, N]
        own = segment[None, :] == np.arange(w.shape[1])[:, None]  # [S, N]; padding (-1) is nobody's
        assert np.all(np.where(own[None, :, None, None, :], 0.0, w) == 0.0), name
        has_tokens = own.any(1)
        assert np.all(np.where(own[None, :, None, None, :], w, 1.0)[:, has_tokens] > 0.0), name


def test_permuting_objects_permutes_blocks(setup):
    cfg, params, _, frames, masks, patches, run = setup
    x, padded = inputs_for(cfg, masks, patches, frames)
    order = np.random.default_rng(3).permutation(40)  # reorder the 40 kept objects
    x2, padded2 = inputs_for(cfg, masks[order], patches, frames)
    _, _, rows, _ = run(params, patches.pixel_values, padded.arrays())
    _, _, rows2, _ = run(params, patches.pixel_values, padded2.arrays())
    n, k_pad = cfg.resampler.num_latents, padded.object_ids.shape[-1]
    otr = np.asarray(rows)[0, :k_pad * n].reshape(k_pad, n, -1)
    otr2 = np.asarray(rows2)[0, :k_pad * n].reshape(k_pad, n, -1)
    assert rel_err(otr2[:40], otr[order]) <= 1e-5  # block j of the permuted run = object order[j]
    twr = np.asarray(rows)[0, k_pad * n:].reshape(-1, n, rows.shape[-1])
    twr2 = np.asarray(rows2)[0, k_pad * n:].reshape(-1, n, rows.shape[-1])
    for j, obj in enumerate(order):  # each object's window blocks move with it
        a, b = twr[padded.window_object == obj], twr2[padded2.window_object == j]
        assert len(a) >= 1 and rel_err(b, a) <= 1e-5


def test_pixels_outside_an_objects_temporal_grids_leave_its_blocks_unchanged(setup):
    """What truly holds with the vision tower in the loop: window and full attention never cross
    temporal grids (frame pairs), so pixels of grids where object k has no selected token cannot
    reach its OTR/TWR outputs: they stay bitwise equal. Pixels outside k's masks but inside one
    of its grids DO change them (window/full attention mixes a frame spatially) - the statement
    "pixels outside k's masks never matter" holds only for the resampler given the token features,
    which test_other_objects_get_exactly_zero_attention pins (exactly zero weight)."""
    cfg, params, _, frames, masks, patches, run = setup
    x, padded = inputs_for(cfg, masks, patches, frames)
    arrays = padded.arrays()
    n, k_pad = cfg.resampler.num_latents, padded.object_ids.shape[-1]
    ends = int(np.flatnonzero(x.object_ids == 4)[0])  # the object seen only on frames 0-1 and 9-10
    per_grid = patches.num_merged_tokens // patches.grid_thw[0]
    grids = set((x.sel_token[x.otr_segment == ends] // per_grid).tolist())
    assert grids == {0, 4, 5}
    windows = np.flatnonzero(x.window_object[:int(x.num_windows)] == ends)
    assert x.window_number[windows].tolist() == [0, 2]  # window 1 (grids 2-3) has no token: skipped

    def blocks(rows):
        rows = np.asarray(rows)[0]
        twr = rows[k_pad * n:].reshape(-1, n, rows.shape[-1])
        return rows[ends * n:(ends + 1) * n], twr[windows]

    base = blocks(run(params, patches.pixel_values, arrays)[2])
    changed = frames.copy()
    changed[2:8] = 255 - changed[2:8]  # every pixel of grids 1-3 (frames 2-7)
    changed_grid = video_input.preprocess_video(changed, cfg.vision, cfg.tokens).pixel_values
    moved = blocks(run(params, changed_grid, arrays)[2])
    np.testing.assert_array_equal(moved[0], base[0])
    np.testing.assert_array_equal(moved[1], base[1])

    inside = frames.copy()  # same grid 0, outside the object's masks (bottom right corner)
    inside[0, 100:, 150:] = 255 - inside[0, 100:, 150:]
    assert not np.any(masks[x.object_ids[ends], 0, 100:, 150:])
    touched = blocks(run(params, video_input.preprocess_video(inside, cfg.vision, cfg.tokens).pixel_values,
                         arrays)[2])
    assert rel_err(touched[0], base[0]) > 1e-6  # spatial mixing in the tower reaches the object's tokens


def test_attention_impl_from_config_gives_the_same_logits(setup):
    """train.attention_impl=xla (jax.nn.dot_product_attention; cudnn is its fused GPU kernel) in the
    vision tower and decoder gives the einsum path's logits; an unknown name fails on first use."""
    cfg, params, _, frames, masks, patches, run = setup
    _, padded = inputs_for(cfg, masks, patches, frames)
    arrays = padded.arrays()
    logits, *_ = run(params, patches.pixel_values, arrays)
    xla_cfg = copy.deepcopy(cfg)
    config_lib.apply_overrides(xla_cfg, ["train.attention_impl=xla"])
    statics = dict(grid_thw=(patches.grid_thw,), num_objects=arrays["object_ids"].shape[-1],
                   num_windows=arrays["window_object"].shape[-1])
    args = {k: arrays[k] for k in ("sel_token", "otr_segment", "twr_segment", "input_ids", "latent_index",
                                   "positions", "attention_mask")}
    xla_logits = jax.jit(lambda p, pv: Traser(xla_cfg).apply({"params": p}, pv, **statics, **args))(
        params, patches.pixel_values)
    length = int(padded.length)
    assert rel_err(np.asarray(xla_logits)[0, :length], np.asarray(logits)[0, :length]) <= TOL
    config_lib.apply_overrides(xla_cfg, ["train.attention_impl=flash"])
    with pytest.raises(config_lib.ConfigError, match="attention_impl 'flash'.*einsum, xla, cudnn"):
        Traser(xla_cfg).apply({"params": params}, patches.pixel_values, **statics, **args)


def test_special_token_past_the_vocabulary_and_cudnn_in_float32_are_refused():
    """A vocab_size override below the special ids (the real Qwen ids with a small table) is a ConfigError
    naming the ids (without the check the lookup would quietly give NaN embeddings); so is cuDNN attention
    with float32 compute, which its kernel does not take, and an unknown train.weight_cast."""
    cfg = config_lib.load("traser_3b", ["text.vocab_size=4096"])
    with pytest.raises(config_lib.ConfigError, match=r"tokens.vision_start_id.*151652.*text.vocab_size 4096"):
        check_shapes(cfg)
    check_shapes(config_lib.load("traser_3b"))
    with pytest.raises(config_lib.ConfigError, match="cudnn needs train.compute_dtype bfloat16"):
        check_shapes(config_lib.load("demo", ["train.attention_impl=cudnn"]))  # demo computes in float32
    with pytest.raises(config_lib.ConfigError, match="weight_cast 'once'.*per_layer, per_step"):
        check_shapes(config_lib.load("tiny", ["train.weight_cast=once"]))

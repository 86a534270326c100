"""Token selection, arrangement, packing (traser_jax.tokens) and frame preprocessing (traser_jax.video_input).

The comparison with the independent per-object torch loop lives in
tests/test_torch_reference.py; here: hand-checked cases, the packed format's
invariants, and bit-exact agreement with transformers' Qwen2-VL video processor.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as tvF
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize as hf_smart_resize

from data_gen import rle
from data_gen.record import Object, Record, Relation, Video, to_traser_json
from traser_jax import config, tokens as tk, video_input as vi


def tiny_config(*overrides):
    return config.load("tiny", list(overrides))


def make_tokenizer():
    """A real byte-level BPE trained on TRASER's text pieces, ids < 400 (the tiny vocab's specials are 500+)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [f"Object {k}: <{4 * w} - {4 * w + 4} sec> system user assistant" for k in range(1, 50) for w in range(9)]
    tok.train_from_iterator(text + [tk.SYSTEM_PROMPT, tk.DEFAULT_PROMPT], trainer)
    return tk.as_token_fn(tok)


def char_tokens(text):
    return [ord(c) for c in text]


# -- video_input ------------------------------------------------------------------

def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(x) for x in rng.integers(20, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        assert vi.smart_resize(h, w, 28, 3136, 200704) == hf_smart_resize(h, w, 28, 3136, 200704)
    assert vi.smart_resize(10, 10, 28, 3136, 200704) == (56, 56)  # lifted to min_pixels
    with pytest.raises(ValueError, match="height=0"):
        vi.smart_resize(0, 10)


@pytest.mark.parametrize("src, dst", [((90, 130), (84, 140)), ((300, 200), (616, 392)), ((57, 301), (28, 140)),
                                      ((224, 224), (224, 224))])
def test_resize_is_torchvision_bit_exact(src, dst):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (2, *src, 3), dtype=np.uint8)
    want = tvF.resize(torch.from_numpy(frames).permute(0, 3, 1, 2), list(dst), antialias=True,
                      interpolation=tvF.InterpolationMode.BICUBIC).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(vi.resize_frames(frames, *dst), want)


@pytest.mark.parametrize("num_frames, height, width", [(5, 90, 130), (4, 300, 200), (3, 56, 84)])
def test_preprocess_equals_qwen2vl_video_processor(num_frames, height, width):
    cfg = tiny_config()
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    got = vi.preprocess_video(frames, cfg.vision, cfg.tokens)
    processor = Qwen2VLVideoProcessor(size={"shortest_edge": cfg.tokens.min_pixels,
                                            "longest_edge": cfg.tokens.max_pixels}, cap_pixels_per_frame=False)
    want = processor(videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], return_tensors="np",
                     do_sample_frames=False)
    assert list(got.grid_thw) == want["video_grid_thw"][0].tolist()
    np.testing.assert_array_equal(got.pixel_values, want["pixel_values_videos"])  # same layout, same floats
    assert got.num_merged_tokens == tk.token_grid(num_frames, height, width, cfg.vision, cfg.tokens).num_tokens


def test_fixed_frame_size_sets_the_grid():
    cfg = tiny_config("tokens.frame_size=[56, 112]")
    frames = np.random.default_rng(4).integers(0, 256, (3, 90, 130, 3), dtype=np.uint8)
    got = vi.preprocess_video(frames, cfg.vision, cfg.tokens)
    assert got.grid_thw == (2, 4, 8) and got.resized_hw == (56, 112)
    grid = tk.token_grid(3, 90, 130, cfg.vision, cfg.tokens)
    assert (grid.merged_h, grid.merged_w) == (2, 4) and grid.num_tokens == got.num_merged_tokens
    with pytest.raises(ValueError, match=r"tokens.frame_size must be \[height, width\], positive multiples of 28"):
        vi.resized_size(90, 130, cfg.vision, tiny_config("tokens.frame_size=[50, 112]").tokens)


def test_preprocess_rejects_bad_frames():
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"frames must be \[T, H, W, 3\]"):
        vi.preprocess_video(np.zeros((2, 56, 56), np.uint8), cfg.vision, cfg.tokens)


# -- selection ----------------------------------------------------------------------

def _hand_masks(scale=1):
    """3 frames of 56x84 (2x3 merged cells; 2 temporal grids, the second padded); see test below."""
    m = np.zeros((4, 3, 56, 84), np.uint8)
    m[0, 0, 0:28, 0:28] = 1  # A: cell 0 fully on frame 0 -> token 0
    m[0, 2, 28:56, 56:70] = 1  # A: half of cell 5 on frame 2 (grid 1 = frames 2, 2) -> 0.5 kept -> token 6 + 5
    m[0, 2, 0:27, 28:56] = 1  # A: 27/28 of cell 1 on frame 2 -> token 6 + 1
    m[1, 1, 0:14, 28:48] = 1  # B: 280/784 = 0.357 of cell 1 on frame 1 -> kept at 0.3 -> token 1
    m[2, 0, 28:32, 0:10] = 1  # C: 40/784 = 0.051 of cell 3 -> best token 3 after 0.5, 0.3, 0.1 fail
    m[2, 1, 28:31, 28:38] = 1  # C: 30/784 of cell 4
    # D (index 3) stays empty -> dropped
    return np.kron(m, np.ones((1, 1, scale, scale), np.uint8))


@pytest.mark.parametrize("scale", [1, 2])
def test_selection_by_hand(scale):
    """Masks at the resized size (scale 1) or twice it (scale 2, area-resized) give the same tokens."""
    cfg = tiny_config()
    masks = _hand_masks(scale)
    grid = tk.token_grid(3, 56 * scale, 84 * scale, cfg.vision, dataclasses.replace(cfg.tokens, max_pixels=4704))
    assert (grid.grid_t, grid.merged_h, grid.merged_w) == (2, 2, 3)
    cov = tk.object_coverage(masks[0], grid)
    assert cov[0, 0, 0] == 1.0 and cov[1, 1, 2] == 0.5 and cov[1, 0, 1] == round(27 / 28, 9)
    assert tk.object_coverage(masks[1], grid)[0, 0, 1] == round(280 / 784, 9)
    sel = tk.select_from_masks(masks, grid, cfg.tokens, 1.0, object_ids=[10, 11, 12, 13])
    assert sel.object_ids == [10, 11, 12]
    assert [t.tolist() for t in sel.object_tokens] == [[0, 7, 11], [1], [3]]


def test_threshold_fallback_steps():
    tokens = tiny_config().tokens
    cov = np.array([[[0.31, 0.29], [0.0, 0.05]]])
    assert tk.select_tokens(cov, tokens).tolist() == [0]  # 0.5 fails, 0.3 keeps 0.31 only
    cov = np.array([[[0.11, 0.29], [0.0, 0.05]]])
    assert tk.select_tokens(cov, tokens).tolist() == [0, 1]  # kept at 0.1
    cov = np.array([[[0.01, 0.09], [0.0, 0.09]]])
    assert tk.select_tokens(cov, tokens).tolist() == [1]  # the single best, first on ties
    cov = np.array([[[0.5, 0.49]]])
    assert tk.select_tokens(cov, tokens).tolist() == [0]  # >= 0.5 is kept


def test_window_layout_and_labels():
    assert tk.window_layout(1.0, 2, 4.0) == (2, 4.0)
    assert tk.window_layout(1.0, 2, 2.0) == (1, 2.0)
    assert tk.window_layout(1.0, 2, 16.0) == (8, 16.0)
    assert tk.window_layout(0.5, 2, 4.0) == (4, 4.0)  # short video sampled at 2 fps
    assert tk.window_layout(2.5, 2, 4.0) == (1, 5.0)  # long video below 1 fps: one grid = 5 s
    assert [tk.window_label(w, 4.0) for w in range(3)] == ["<0 - 4 sec>", "<4 - 8 sec>", "<8 - 12 sec>"]
    assert tk.window_label(1, 2.5) == "<3 - 5 sec>"  # rounded half up
    with pytest.raises(ValueError, match="window_seconds"):
        tk.window_layout(1.0, 2, 0.0)


# -- arrangement --------------------------------------------------------------------

def _hand_selection():
    grid = tk.TokenGrid(num_frames=9, grid_t=5, merged_h=2, merged_w=3, temporal_patch_size=2)
    # 6 tokens per grid; 1 s per frame and 4 s windows -> 2 grids (12 tokens) per window
    return tk.Selection(grid, 1.0, [7, 3], [np.array([0, 5, 30, 31]), np.array([13])])


def test_arrangement_by_hand():
    cfg = tiny_config()
    t, n = cfg.tokens, 4
    x = tk.arrange(_hand_selection(), char_tokens, t, n, prefix_ids=[1, 2], suffix_ids=[3], target_ids=[8, 9])
    lat = [t.video_token_id] * n
    block1 = [t.obj_traj_start_id, *char_tokens("Object 1: "), t.vision_start_id, *lat,
              *char_tokens("<0 - 4 sec>"), *lat, *char_tokens("<8 - 12 sec>"), *lat,  # window 1 is skipped
              t.vision_end_id, t.obj_traj_end_id]
    block2 = [t.obj_traj_start_id, *char_tokens("Object 2: "), t.vision_start_id, *lat,
              *char_tokens("<4 - 8 sec>"), *lat, t.vision_end_id, t.obj_traj_end_id]
    assert x.input_ids.tolist() == [1, 2, *block1, *block2, 3, 8, 9]
    assert x.object_ids.tolist() == [7, 3] and int(x.num_objects) == 2 and int(x.num_windows) == 3
    assert x.sel_token.tolist() == [0, 5, 30, 31, 13]
    assert x.otr_segment.tolist() == [0, 0, 0, 0, 1]
    assert x.twr_segment.tolist() == [0, 0, 1, 1, 2]
    assert x.window_object.tolist() == [0, 0, 1] and x.window_number.tolist() == [0, 2, 1]
    # latent rows: OTR of object k -> k*n.., TWR slot s -> (K + s)*n.. with K = 2
    rows = x.latent_index[x.latent_index >= 0].tolist()
    assert rows == [*range(0, 4), *range(8, 12), *range(12, 16), *range(4, 8), *range(16, 20)]
    assert (x.input_ids[x.latent_index >= 0] == t.video_token_id).all()
    assert x.positions.tolist() == list(range(len(x.input_ids))) and x.attention_mask.all()
    assert x.labels.tolist() == [tk.IGNORE_INDEX] * (len(x.input_ids) - 2) + [8, 9]


def test_cap_drops_trailing_objects_whole():
    cfg = tiny_config()
    sel = _hand_selection()
    full = tk.arrange(sel, char_tokens, cfg.tokens, 4)
    first_block = int(np.flatnonzero(full.input_ids == cfg.tokens.obj_traj_end_id)[0]) + 1
    capped = tk.arrange(sel, char_tokens, dataclasses.replace(cfg.tokens, max_tokens=first_block), 4)
    assert capped.input_ids.tolist() == full.input_ids[:first_block].tolist()
    assert capped.object_ids.tolist() == [7] and int(capped.num_windows) == 2 and capped.sel_token.tolist() == [0, 5, 30, 31]
    with pytest.raises(ValueError, match=r"tokens.max_tokens=10 is smaller than the first object's block"):
        tk.arrange(sel, char_tokens, dataclasses.replace(cfg.tokens, max_tokens=10), 4)


def test_max_objects_and_empty_objects():
    cfg = tiny_config()
    grid = tk.TokenGrid(num_frames=2, grid_t=1, merged_h=1, merged_w=1, temporal_patch_size=2)
    masks = np.zeros((45, 2, 28, 28), np.uint8)
    masks[:, 0, :20] = 1
    masks[[2, 30], :] = 0  # two empty objects are skipped before counting 40
    sel = tk.select_from_masks(masks, grid, cfg.tokens, 1.0)
    kept = [i for i in range(45) if i not in (2, 30)][:40]
    assert sel.object_ids == kept


# -- packing ------------------------------------------------------------------------

def _latent_meaning(x, index):
    """(kind, slot, j) of every latent position, from latent_index and the arrays' K, W."""
    k, n = x.object_ids.shape[-1], x.num_latents
    return [("otr", r // n, r % n) if r < k * n else ("twr", (r - k * n) // n, r % n) for r in index if r >= 0]


def test_pad_to_buckets_keeps_meaning():
    cfg = tiny_config("tokens.bucket_selected=[4, 8]", "tokens.bucket_length=[64, 128, 256]",
                      "tokens.bucket_objects=[1, 4]", "tokens.bucket_windows=[2, 8]")
    x = tk.arrange(_hand_selection(), char_tokens, cfg.tokens, 4)
    p = tk.pad_to_buckets(x, cfg.tokens)
    assert (int(x.num_selected), int(x.length), int(x.num_objects), int(x.num_windows)) == (5, 82, 2, 3)
    assert (p.sel_token.shape, p.input_ids.shape, p.object_ids.shape, p.window_object.shape) == ((8,), (128,), (4,), (8,))
    assert _latent_meaning(p, p.latent_index) == _latent_meaning(x, x.latent_index)
    real = int(x.length)
    for name in ("input_ids", "positions", "attention_mask", "labels"):
        np.testing.assert_array_equal(getattr(p, name)[:real], getattr(x, name))
    assert (p.attention_mask[real:] == 0).all() and (p.latent_index[real:] == -1).all()
    assert (p.otr_segment[5:] == -1).all() and (p.twr_segment[5:] == -1).all() and (p.object_ids[2:] == -1).all()
    assert tk.bucket_size(0, [4, 8]) == 4 and tk.bucket_size(9, [4, 8]) == 16 and tk.bucket_size(17, [4, 8]) == 24
    with pytest.raises(ValueError, match="ascending"):
        tk.bucket_size(3, [8, 4])


def test_stack_offsets_tokens_per_video():
    cfg = tiny_config()
    a = tk.arrange(_hand_selection(), char_tokens, cfg.tokens, 4)
    sel = _hand_selection()
    sel.object_tokens = sel.object_tokens[:1]
    sel.object_ids = sel.object_ids[:1]
    b = tk.arrange(sel, char_tokens, cfg.tokens, 4)
    batch = tk.stack([a, b], cfg.tokens)
    assert batch.input_ids.shape[0] == 2 and batch.sel_token.shape[1] == cfg.tokens.bucket_selected[0]
    assert batch.sel_token[0, :5].tolist() == [0, 5, 30, 31, 13]
    assert batch.sel_token[1, :4].tolist() == [30, 35, 60, 61]  # offset by video a's 30 merged tokens
    assert batch.num_objects.tolist() == [2, 1] and batch.num_vision_tokens.tolist() == [30, 30]
    assert (batch.otr_segment[1, 4:] == -1).all()


# -- from a record ------------------------------------------------------------------

def _record_from_masks(masks, fps=1.0):
    k, t, h, w = masks.shape
    video = Video(id="v", source="synthetic", fps=fps, num_frames=t, width=w, height=h,
                  frame_indices=list(range(t)), timestamps=[i / fps for i in range(t)])
    objects = [Object(id=100 + i, name=f"thing{i}", attributes=[], masks=[rle.encode(m) for m in masks[i]])
               for i in range(k)]
    return Record(video=video, objects=objects).validate()


def test_record_path_equals_array_path():
    cfg = tiny_config()
    rng = np.random.default_rng(3)
    masks = np.zeros((5, 7, 90, 130), np.uint8)
    for i in range(4):  # object 4 stays empty
        y, x = rng.integers(0, 60), rng.integers(0, 100)
        masks[i, rng.integers(0, 2):, y:y + rng.integers(3, 30), x:x + rng.integers(3, 30)] = 1
    record = _record_from_masks(masks)
    from_record = tk.select_from_record(record, cfg.vision, cfg.tokens)
    grid = tk.token_grid(7, 90, 130, cfg.vision, cfg.tokens)
    from_masks = tk.select_from_masks(record.masks_array(), grid, cfg.tokens, 1.0, [o.id for o in record.objects])
    assert from_record.object_ids == from_masks.object_ids == [100, 101, 102, 103]
    assert [t.tolist() for t in from_record.object_tokens] == [t.tolist() for t in from_masks.object_tokens]

    token_fn = make_tokenizer()
    x = tk.prepare(record, token_fn, cfg, target_text='{"objects": []}')
    prefix, suffix = tk.chat_texts()
    assert x.input_ids[:len(token_fn(prefix))].tolist() == token_fn(prefix)
    target = token_fn('{"objects": []}<|im_end|>')
    assert x.labels[-len(target):].tolist() == target and (x.labels[:-len(target)] == tk.IGNORE_INDEX).all()
    assert token_fn("<|im_end|>") == [1]  # the chat specials are single tokens of the real BPE


def test_callable_target_sees_only_kept_objects():
    cfg = tiny_config("tokens.max_objects=2")
    masks = np.zeros((4, 3, 56, 84), np.uint8)
    masks[[0, 2, 3], :, 10:40, 10:40] = 1  # object 101 is empty; 100 and 102 are kept, 103 is past the cap
    record = _record_from_masks(masks)
    record.relations = [Relation(100, "near", 102, "spatial", [(0.0, 1.0)]),
                        Relation(102, "near", 103, "spatial", [(0.0, 1.0)]),
                        Relation(100, "looking at", -1, "attentional", [(1.0, 2.0)])]
    seen = []
    x = tk.prepare(record.validate(), char_tokens, cfg,
                   target_text=lambda r: seen.append(r) or json.dumps(to_traser_json(r)))
    assert x.object_ids.tolist() == [100, 102] and [o.id for o in seen[0].objects] == [100, 102]
    answer = to_traser_json(seen[0])
    assert answer["relationships"] == [[1, "near", 2, [[0, 1]]], [1, "looking at", -1, [[1, 2]]]]
    assert x.labels[x.labels != tk.IGNORE_INDEX].tolist() == char_tokens(json.dumps(answer) + "<|im_end|>")


def test_bad_masks_are_named():
    cfg = tiny_config()
    grid = tk.token_grid(3, 56, 84, cfg.vision, cfg.tokens)
    with pytest.raises(ValueError, match=r"masks must be \[num_frames=3, H, W\]"):
        tk.object_coverage(np.zeros((2, 56, 84), np.uint8), grid)
    with pytest.raises(ValueError, match="object_ids has 1 entries, masks has 2 objects"):
        tk.select_from_masks(np.ones((2, 3, 56, 84), np.uint8), grid, cfg.tokens, 1.0, [5])

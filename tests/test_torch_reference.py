"""The PyTorch TRASER reference (traser_jax.torch_reference) on tiny random transformers models.

- its per-object loop and the packed numpy path (traser_jax.tokens) arrange the
  same sequence from the same tokens, on randomized masks covering odd frame
  counts, non-square frames, the threshold fallback, skipped windows, more than
  40 objects and the token cap;
- the packed arrays, run through the same torch modules one segment at a time,
  give the reference's logits (so `latent_index` and the segments mean what the
  Flax model assumes);
- forward is deterministic, checkpoints round-trip (sharded, legacy names) and
  transformers loads the Qwen2.5-VL part; greedy decoding with the KV cache
  equals recomputation.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize as hf_smart_resize

from test_tokens import make_tokenizer, tiny_config
from traser_jax import tokens as tk, video_input as vi
from traser_jax.torch_reference import TraserReference, preprocess_frames, read_safetensors

N_LATENTS = 4  # configs/tiny.yaml


@pytest.fixture(scope="module")
def token_fn():
    return make_tokenizer()


def random_model(cfg, seed=0):
    """A tiny reference with every weight random (norm gains around 1), never the constant init."""
    torch.manual_seed(seed)
    model = TraserReference.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("latents"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config())


# -- random masks -------------------------------------------------------------------

def random_masks(rng, kinds, t, h, w):
    """One object per kind: 'blob' (moving ellipse, sometimes absent), 'tiny' (a few pixels on 1-2
    frames: the fallback), 'empty', 'gappy' (a blob on the first two frames and the last only)."""
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.zeros((len(kinds), t, h, w), np.uint8)
    for i, kind in enumerate(kinds):
        if kind == "empty":
            continue
        if kind == "tiny":
            for f in rng.choice(t, size=rng.integers(1, 3), replace=False):
                y, x = rng.integers(0, h - 3), rng.integers(0, w - 4)
                masks[i, f, y:y + rng.integers(1, 4), x:x + rng.integers(1, 5)] = 1
            continue
        start, end = rng.uniform([0, 0], [h, w]), rng.uniform([0, 0], [h, w])
        radius = rng.uniform(5, min(h, w) / 2.5, size=2)
        frames = [0, 1, t - 1] if kind == "gappy" else [f for f in range(t) if rng.random() < 0.85]
        for f in frames:
            cy, cx = start + (end - start) * f / max(t - 1, 1)
            masks[i, f] = ((yy - cy) / radius[0]) ** 2 + ((xx - cx) / radius[1]) ** 2 <= 1
    return masks


CASES = {
    # name: (kinds, frames, height, width, seconds per frame, token overrides)
    "odd-frames-nonsquare-skips": (["blob", "tiny", "empty", "gappy", "blob", "tiny", "blob"], 13, 90, 130, 1.0, []),
    "more-than-40-objects": (["blob", "tiny", "blob", "blob", "empty"] * 10 + ["blob"] * 3, 5, 60, 100, 1.0,
                             ["tokens.window_seconds=2"]),
    "token-cap": (["blob", "tiny", "gappy"] * 4, 9, 100, 70, 0.5, ["tokens.max_tokens=230",
                                                                    "tokens.window_seconds=8"]),
    "long-video": (["blob", "gappy", "tiny", "blob"], 7, 84, 84, 2.5, ["tokens.window_seconds=4"]),
}


def grid_thw_of(cfg, t, h, w):
    rh, rw = hf_smart_resize(h, w, 28, cfg.tokens.min_pixels, cfg.tokens.max_pixels)
    return torch.tensor([[-(-t // 2), rh // 14, rw // 14]])


def packed(cfg, masks, seconds_per_frame, token_fn, prompt=tk.DEFAULT_PROMPT):
    t, h, w = masks.shape[1:]
    grid = tk.token_grid(t, h, w, cfg.vision, cfg.tokens)
    prefix, suffix = tk.chat_texts(prompt)
    sel = tk.select_from_masks(masks, grid, cfg.tokens, seconds_per_frame)
    return sel, tk.arrange(sel, token_fn, cfg.tokens, N_LATENTS, token_fn(prefix), token_fn(suffix))


def assert_same_arrangement(x, ref_arr):
    assert x.input_ids.tolist() == ref_arr.input_ids
    assert x.object_ids.tolist() == ref_arr.object_ids
    for slot, tokens in enumerate(ref_arr.object_tokens):
        assert sorted(x.sel_token[x.otr_segment == slot].tolist()) == tokens
    assert int(x.num_windows) == len(ref_arr.windows)
    for s, (slot, window, tokens) in enumerate(ref_arr.windows):
        assert (int(x.window_object[s]), int(x.window_number[s])) == (slot, window)
        assert sorted(x.sel_token[x.twr_segment == s].tolist()) == tokens


@pytest.mark.parametrize("case", list(CASES))
def test_packed_arrangement_equals_reference_loop(case, token_fn):
    kinds, t, h, w, spf, overrides = CASES[case]
    cfg = tiny_config(*overrides)
    model = TraserReference.from_config(cfg)  # arrangement needs no weights
    for seed in range(3):
        rng = np.random.default_rng(seed)
        masks = random_masks(rng, kinds, t, h, w)
        sel, x = packed(cfg, masks, spf, token_fn)
        ref_arr = model.arrange(masks, grid_thw_of(cfg, t, h, w), token_fn, seconds_per_frame=spf)
        assert_same_arrangement(x, ref_arr)

        # the case covers what its name says
        grid = sel.grid
        nonempty = [i for i in range(len(kinds)) if masks[i].any()]
        fallback = [i for i in sel.object_ids if tk.object_coverage(masks[i], grid).max() < 0.5]
        assert fallback, "no object needed the threshold fallback"
        if case == "more-than-40-objects":
            assert len(nonempty) > 40 and sel.object_ids == nonempty[:40]
        if case == "token-cap":
            assert 0 < int(x.num_objects) < len(sel.object_ids)
        if case == "odd-frames-nonsquare-skips":
            assert t % 2 and h != w
            gappy = ref_arr.object_ids.index(3)
            assert [wi for slot, wi, _ in ref_arr.windows if slot == gappy] == [0, 3]  # windows 1, 2 skipped
        if case == "long-video":  # 2.5 s per frame: one temporal grid (5 s) per window
            assert tk.window_layout(spf, 2, 4.0) == (1, 5.0)
            label = token_fn("<5 - 10 sec>")
            assert any(wi == 1 for _, wi, _ in ref_arr.windows)
            assert any(ref_arr.input_ids[i:i + len(label)] == label for i in range(len(ref_arr.input_ids)))


def test_toyworld_record_arrangement_equals_reference(token_fn):
    from data_gen.toyworld import generate_video

    cfg = tiny_config()
    record, frames = generate_video(seed=0, index=3)
    model = TraserReference.from_config(cfg)
    x = tk.prepare(record, token_fn, cfg)
    grid_thw = grid_thw_of(cfg, *frames.shape[:3])
    ref_arr = model.arrange(record.masks_array(), grid_thw, token_fn,
                            seconds_per_frame=tk.sampling_period(record.video),
                            object_ids=[o.id for o in record.objects])
    assert int(x.num_objects) > 0
    assert_same_arrangement(x, ref_arr)
    assert list(vi.preprocess_video(frames, cfg.vision, cfg.tokens).grid_thw) == grid_thw[0].tolist()


# -- forward ------------------------------------------------------------------------

def _video(seed=5, t=5, h=90, w=130):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    masks = random_masks(rng, ["blob", "tiny", "gappy", "empty", "blob"], t, h, w)
    return frames, masks


def max_rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_forward_is_deterministic_and_packed_path_agrees(model, token_fn):
    cfg = tiny_config()
    frames, masks = _video()
    with torch.no_grad():
        out = model(frames, masks, token_fn)
        again = model(frames, masks, token_fn)
    assert torch.equal(out.logits, again.logits) and torch.isfinite(out.logits).all()
    assert out.logits.shape == (len(out.arrangement.input_ids), cfg.text.vocab_size)
    assert out.otr.shape == (len(out.arrangement.object_ids), N_LATENTS, cfg.text.hidden_size)
    np.testing.assert_array_equal(vi.preprocess_video(frames, cfg.vision, cfg.tokens).pixel_values,
                                  out.pixel_values.numpy())

    # The packed arrays through the same modules, one unpadded segment at a time.
    _, x = packed(cfg, masks, 1.0, token_fn)
    buckets = dataclasses.replace(cfg.tokens, bucket_selected=[int(x.num_selected) + 5],
                                  bucket_length=[int(x.length) + 7], bucket_objects=[int(x.num_objects) + 2],
                                  bucket_windows=[int(x.num_windows) + 3])
    p = tk.pad_to_buckets(x, buckets)  # real padding on every axis
    with torch.no_grad():
        context = out.vision[torch.from_numpy(p.sel_token).long()]

        def per_segment(resampler, segment, slots):
            rows = []
            for s in range(slots):
                hit = torch.from_numpy(segment == s)
                rows.append(resampler(context[hit][None], torch.ones(1, int(hit.sum()), dtype=torch.long))[0]
                            if hit.any() else torch.zeros(N_LATENTS, cfg.text.hidden_size))
            return torch.cat(rows)

        table = torch.cat([per_segment(model.otr_resampler, p.otr_segment, p.object_ids.shape[0]),
                           per_segment(model.twr_resampler, p.twr_segment, p.window_object.shape[0])])
        ids = torch.from_numpy(p.input_ids).long()[None]
        embeds = model.model.get_input_embeddings()(ids)
        latent = torch.from_numpy(p.latent_index).long()
        embeds[0, latent >= 0] = table[latent[latent >= 0]]
        logits, _ = model.language_model(inputs_embeds=embeds[:, :int(p.length)])
    assert max_rel_err(embeds[0, :int(p.length)], out.inputs_embeds) <= 1e-5
    assert max_rel_err(logits[0], out.logits) <= 1e-5


def test_fixed_frame_size_preprocessing_matches(model):
    cfg = tiny_config("tokens.frame_size=[56, 112]")
    frames, _ = _video(seed=7)
    pixel_values, grid_thw = preprocess_frames(frames, cfg.tokens)
    got = vi.preprocess_video(frames, cfg.vision, cfg.tokens)
    assert grid_thw[0].tolist() == list(got.grid_thw) == [3, 4, 8]
    np.testing.assert_array_equal(got.pixel_values, pixel_values.numpy())


def test_generate_with_cache_equals_recompute(model, token_fn):
    frames, masks = _video(seed=6)
    with torch.no_grad():
        out = model(frames, masks, token_fn)
        generated = model.generate(out.pixel_values, out.grid_thw, out.arrangement, max_new_tokens=4,
                                   eos_token_ids=(), repetition_penalty=1.05)
        embeds, seen = out.inputs_embeds[None], list(out.arrangement.input_ids)
        for token in generated:  # no cache: the whole sequence each step
            logits, _ = model.language_model(inputs_embeds=embeds)
            scores = logits[0, -1].clone()
            idx = torch.tensor(sorted(set(seen)))
            scores[idx] = torch.where(scores[idx] < 0, scores[idx] * 1.05, scores[idx] / 1.05)
            assert int(torch.argmax(scores)) == token
            seen.append(token)
            embeds = torch.cat([embeds, model.model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    assert len(generated) == 4


# -- checkpoints --------------------------------------------------------------------

def test_checkpoint_round_trip_and_transformers_loads_it(model, tmp_path, token_fn):
    model.save_pretrained(tmp_path / "one")
    saved = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert "lm_head.weight" not in saved  # tied, as transformers saves it
    assert all(k.startswith(("model.visual.", "model.language_model.", "otr_resampler.", "twr_resampler."))
               for k in saved)
    assert {k for k in saved if k.startswith("otr_resampler.")} == {
        k.replace("twr_", "otr_") for k in saved if k.startswith("twr_resampler.")}
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["resampler_config"]["resampler_n_latents"] == N_LATENTS and config["traser_tokens"]["video_token_id"] == 502

    state = {k: v for k, v in model.state_dict().items()}
    for sub, kwargs in (("one", {}), ("sharded", {"max_shard_bytes": 300_000})):
        if kwargs:
            model.save_pretrained(tmp_path / sub, **kwargs)
            assert (tmp_path / sub / "model.safetensors.index.json").exists()
        loaded = TraserReference.from_pretrained(tmp_path / sub)
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    # transformers 4.x names (visual.*, model.layers.*) load to the same tensors
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    save_file({k.replace("model.visual.", "visual.").replace("model.language_model.", "model."): v
               for k, v in saved.items()}, str(legacy / "model.safetensors"))
    loaded = TraserReference.from_pretrained(legacy)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    # transformers reads the Qwen2.5-VL part and gives the same text logits
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "one", attn_implementation="eager").eval()
    ids = torch.tensor([token_fn("<|im_start|>user\nObject 1: <0 - 4 sec><|im_end|>")])
    with torch.no_grad():
        ours, _ = model.language_model(input_ids=ids)
        assert max_rel_err(hf(input_ids=ids).logits, ours) <= 1e-6

    # a plain Qwen2.5-VL directory needs the resampler shapes from the caller
    plain = tmp_path / "plain"
    hf.save_pretrained(plain)
    config = json.loads((plain / "config.json").read_text())
    assert config.pop("resampler_config") and config.pop("traser_tokens")  # transformers kept our extra keys
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no resampler_config"):
        TraserReference.from_pretrained(plain)
    started = TraserReference.from_pretrained(plain, resampler=tiny_config().resampler)
    assert torch.equal(started.lm_head.weight, model.lm_head.weight)


def test_untied_head_is_saved(tmp_path):
    cfg = tiny_config("text.tie_word_embeddings=false")
    model = random_model(cfg, seed=1)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in read_safetensors(tmp_path)
    loaded = TraserReference.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.get_input_embeddings().weight)


def test_resampler_config_must_match_idefics2():
    with pytest.raises(ValueError, match=r"resampler.intermediate_size must be 4 x resampler.hidden_size=256"):
        TraserReference.from_config(dataclasses.replace(tiny_config(), resampler=dataclasses.replace(
            tiny_config().resampler, intermediate_size=128)))

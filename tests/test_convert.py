"""Weights in and out: from-hf then to-hf gives the original tensors exactly; transformers and the
PyTorch reference load the export; `--summary` of traser_3b equals transformers' own count of
Qwen2.5-VL-3B (meta device, nothing allocated) plus two Idefics2 resamplers."""
import json
import re

import jax
import numpy as np
import pytest
import torch
from parity_helpers import FLOAT32, all_hf_tensors, build_qwen, build_resampler, save_traser_dir, tiny_config
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

from traser_jax import config as config_lib
from traser_jax import convert, model

# Qwen/Qwen2.5-VL-3B-Instruct's config.json as published (pre-v5 flat layout).
PUBLISHED_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


def hf_dir_with_resamplers(tmp_path, *overrides, **save_kwargs):
    cfg = tiny_config(*overrides)
    qwen = build_qwen(cfg, seed=31)
    return save_traser_dir(tmp_path / "hf", qwen, build_resampler(cfg, 32), build_resampler(cfg, 33), **save_kwargs)


@pytest.mark.parametrize("tied, shard", [(True, "40KB"), (False, None)])
def test_round_trip_is_exact_and_loads_in_transformers(tmp_path, tied, shard):
    hf_dir = hf_dir_with_resamplers(tmp_path, f"text.tie_word_embeddings={str(tied).lower()}",
                                    max_shard_size=shard)
    assert (hf_dir / "model.safetensors.index.json").exists() == (shard is not None)
    cfg, _ = convert.from_hf(hf_dir, tmp_path / "ckpt", preset="tiny", overrides=FLOAT32, progress=False)
    out = convert.to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_size="60KB", progress=False)
    assert (out / "model.safetensors.index.json").exists()  # sharded past the size
    original, exported = all_hf_tensors(hf_dir), all_hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name

    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True,
                                                                     attn_implementation="eager")
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert all(k.startswith(("otr_resampler.", "twr_resampler.")) for k in info["unexpected_keys"])
    assert len(info["unexpected_keys"]) == 2 * len(build_resampler(cfg, 0).state_dict())
    reference = build_qwen(cfg, seed=31)
    ids = torch.randint(0, cfg.text.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_export_loads_in_the_pytorch_reference(tmp_path):
    from traser_jax.torch_reference import TraserReference
    hf_dir = hf_dir_with_resamplers(tmp_path)
    convert.from_hf(hf_dir, tmp_path / "ckpt", preset="tiny", overrides=FLOAT32, progress=False)
    out = convert.to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
    ref = TraserReference.from_pretrained(out)
    original = all_hf_tensors(hf_dir)
    for name, tensor in ref.otr_resampler.state_dict().items():
        assert torch.equal(tensor, original["otr_resampler." + name])
    assert torch.equal(ref.model.visual.blocks[1].attn.qkv.weight, original["visual.blocks.1.attn.qkv.weight"])


def test_checkpoint_api_and_dtypes(tmp_path):
    hf_dir = hf_dir_with_resamplers(tmp_path)
    cfg, params = convert.from_hf(hf_dir, tmp_path / "ckpt", preset="tiny", overrides=FLOAT32, progress=False)
    loaded_cfg, loaded = convert.load_checkpoint(tmp_path / "ckpt")
    assert loaded_cfg.to_dict() == cfg.to_dict()
    flat, loaded_flat = convert.traverse_util.flatten_dict(params), convert.traverse_util.flatten_dict(loaded)
    assert flat.keys() == loaded_flat.keys()
    for path in flat:
        np.testing.assert_array_equal(np.asarray(loaded_flat[path]), flat[path])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, bf16 = convert.load_checkpoint(tmp_path / "ckpt", shardings=jax.tree.map(lambda _: device, params),
                                      dtype="bfloat16")
    assert bf16["llm"]["norm"]["scale"].dtype == np.dtype("bfloat16")
    assert bf16["vision"]["patch_embed"].sharding == device
    # the abstract tree (what training shards) has the same structure and shapes
    abstract = convert.traverse_util.flatten_dict(model.abstract_params(cfg, boxed=False))
    assert {p: tuple(v.shape) for p, v in abstract.items()} == {p: v.shape for p, v in flat.items()}


def test_plain_qwen_gets_fresh_resamplers_and_special_tokens(tmp_path, capfd):
    cfg = tiny_config()
    hf_dir = save_traser_dir(tmp_path / "hf", build_qwen(cfg, seed=34))
    (hf_dir / "added_tokens.json").write_text(json.dumps({"<|video_pad|>": 502, "<obj_traj_start>": 510,
                                                          "<obj_traj_end>": 511}))
    assert convert.main(["from-hf", str(hf_dir), str(tmp_path / "ckpt"), "--config", "tiny", *FLOAT32]) == 0
    err = capfd.readouterr().err
    assert "has no resamplers" in err and "initialising both at random" in err
    loaded_cfg, params = convert.load_checkpoint(tmp_path / "ckpt")
    assert (loaded_cfg.tokens.obj_traj_start_id, loaded_cfg.tokens.obj_traj_end_id) == (510, 511)
    latents = np.asarray(params["otr_resampler"]["latents"])
    assert latents.shape == (4, 64) and np.std(latents) > 0 and not np.array_equal(
        latents, np.asarray(params["twr_resampler"]["latents"]))
    assert (tmp_path / "ckpt" / "hf_assets" / "added_tokens.json").exists()
    assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["traser_tokens"]["obj_traj_start_id"] == 510
    assert written["resampler_config"]["resampler_n_latents"] == 4


def test_custom_prefixes_and_clear_errors(tmp_path):
    cfg = tiny_config()
    qwen = build_qwen(cfg, seed=35)
    hf_dir = save_traser_dir(tmp_path / "hf", qwen, build_resampler(cfg, 1), build_resampler(cfg, 2),
                             otr_prefix="object_resampler.", twr_prefix="window_resampler.")
    with pytest.raises(ValueError, match=r"map to nothing: object_resampler\.latents"):
        convert.from_hf(hf_dir, tmp_path / "a", preset="tiny", overrides=FLOAT32, progress=False)
    convert.from_hf(hf_dir, tmp_path / "b", preset="tiny", overrides=FLOAT32, progress=False,
                    otr_prefix="object_resampler.", twr_prefix="window_resampler.")
    tensors = {k: v.numpy() for k, v in all_hf_tensors(hf_dir).items()}
    good = convert.config_from_hf(json.loads((hf_dir / "config.json").read_text()), tiny_config())
    missing = {k: v for k, v in tensors.items() if k != "visual.blocks.2.attn.proj.weight"}
    with pytest.raises(KeyError, match=r"visual\.blocks\.2\.attn\.proj\.weight.*vision/blocks/proj/kernel"):
        convert.hf_to_params(missing, good, resamplers=False, ignore_unmapped=True)
    wrong = dict(tensors, **{"model.layers.1.mlp.up_proj.weight": np.zeros((5, 64), np.float32)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(5, 64\).*\(96, 64\)"):
        convert.hf_to_params(wrong, good, resamplers=False, ignore_unmapped=True)
    with pytest.raises(ValueError, match="use_sliding_window"):
        convert.config_from_hf(dict(PUBLISHED_3B, use_sliding_window=True), tiny_config())


def test_published_config_reads_as_traser_3b():
    cfg = convert.config_from_hf(PUBLISHED_3B, config_lib.load("tiny"))
    preset = config_lib.load("traser_3b")
    for section in ("vision", "text"):  # the resampler shapes of a plain Qwen2.5-VL come from the preset
        assert getattr(cfg, section) == getattr(preset, section), section
    assert (cfg.tokens.vision_start_id, cfg.tokens.video_token_id) == (151652, 151656)
    # and the config we would write back is read by transformers as the same architecture
    written = Qwen2_5_VLConfig(**convert.hf_config(preset))
    assert written.text_config.num_key_value_heads == 2 and written.vision_config.fullatt_block_indexes == [7, 15,
                                                                                                          23, 31]


def test_summary_matches_transformers_meta_count(capsys):
    with torch.device("meta"):
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**PUBLISHED_3B))
        resampler = Idefics2PerceiverResampler(Idefics2PerceiverConfig(
            hidden_size=2048, resampler_n_latents=32, resampler_depth=3, resampler_n_heads=16,
            resampler_head_dim=96, num_key_value_heads=4, rms_norm_eps=1e-6, hidden_act="silu"))
    hf_total = qwen.num_parameters()  # tied lm_head counted once
    hf_vision = sum(p.numel() for p in qwen.model.visual.parameters())
    assert model.main(["--config", "configs/traser_3b.yaml", "--summary"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["vision"] + counts["llm"] == hf_total == 3_754_622_976
    assert counts["vision"] == hf_vision
    assert counts["resamplers"] == 2 * resampler.num_parameters()
    assert counts["total"] == hf_total + 2 * resampler.num_parameters()


def test_docstring_table_lists_every_rule():
    cfg = tiny_config("text.tie_word_embeddings=false")
    table = convert.__doc__
    for comp in convert.components(cfg):
        for rule in comp.rules:
            prefix = "R." if "resampler" in comp.name else comp.prefix
            assert re.search(rf"\| {re.escape(prefix + rule.hf)}\b", table), prefix + rule.hf
            assert "/".join(("R" if "resampler" in comp.name else comp.name, *rule.flax)) in table

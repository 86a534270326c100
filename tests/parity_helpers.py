"""Shared pieces of the parity tests: tiny random transformers models built from our configs,
saved as a TRASER checkpoint directory, converted with traser_jax.convert.

Random weights are drawn wider than HF's init (std 1/sqrt(fan_in), norms 1 + 0.2 N(0, 1),
biases 0.1 N(0, 1)) so that attention is far from uniform and every path matters.
Relative error = max |ours - ref| / max |ref| over the compared tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

from traser_jax import config as config_lib
from traser_jax.config import Config

TOL = 1e-4
FLOAT32 = ["train.compute_dtype=float32", "train.param_dtype=float32"]


def tiny_config(*overrides: str) -> Config:
    return config_lib.load("tiny", [*FLOAT32, *overrides])


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif p.ndim == 1:  # norm scales
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("latents"):
            p.copy_(noise)
        else:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(noise / fan_in ** 0.5)
    return module


def qwen_hf_config(cfg: Config) -> Qwen2_5_VLConfig:
    """transformers' config for our tiny shapes, written out field by field (independent of convert.py)."""
    t, v, k = cfg.text, cfg.vision, cfg.tokens
    half = t.hidden_size // t.num_heads // 2
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps,
                         max_position_embeddings=t.max_position_embeddings, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_heads=v.num_heads, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                           spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                           fullatt_block_indexes=list(v.fullatt_block_indexes), out_hidden_size=v.out_hidden_size),
        tie_word_embeddings=t.tie_word_embeddings, video_token_id=k.video_token_id,
        vision_start_token_id=k.vision_start_id, vision_end_token_id=k.vision_end_id)


def perceiver_hf_config(cfg: Config) -> Idefics2PerceiverConfig:
    r = cfg.resampler
    return Idefics2PerceiverConfig(hidden_size=r.hidden_size, resampler_n_latents=r.num_latents,
                                   resampler_depth=r.depth, resampler_n_heads=r.num_heads,
                                   resampler_head_dim=r.head_dim, num_key_value_heads=r.num_kv_heads,
                                   rms_norm_eps=r.rms_norm_eps, hidden_act="silu")


def build_qwen(cfg: Config, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_hf_config(cfg), attn_implementation="eager",
                                                            dtype=torch.float32)
    return randomize_(model, seed).eval()


def build_resampler(cfg: Config, seed: int) -> Idefics2PerceiverResampler:
    torch.manual_seed(seed)
    model = Idefics2PerceiverResampler._from_config(perceiver_hf_config(cfg), attn_implementation="eager",
                                                    dtype=torch.float32)
    return randomize_(model, seed).eval()


def save_traser_dir(directory: Path, qwen, otr=None, twr=None, *, with_resampler_config: bool = True,
                    otr_prefix: str = "otr_resampler.", twr_prefix: str = "twr_resampler.",
                    max_shard_size: str | None = None) -> Path:
    """transformers' save_pretrained of the Qwen part, plus the resampler tensors under their prefixes."""
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    qwen.save_pretrained(directory, **kwargs)
    if otr is not None:
        extra = {otr_prefix + k: v.contiguous() for k, v in otr.state_dict().items()}
        extra.update({twr_prefix + k: v.contiguous() for k, v in twr.state_dict().items()})
        save_file(extra, str(directory / "resamplers.safetensors"), metadata={"format": "pt"})
        index_path = directory / "model.safetensors.index.json"
        if index_path.exists():  # sharded: list the extra file in the index
            index = json.loads(index_path.read_text())
            index["weight_map"].update({k: "resamplers.safetensors" for k in extra})
            index_path.write_text(json.dumps(index))
        else:  # single file: merge into it
            merged = load_file(str(directory / "model.safetensors"))
            merged.update(extra)
            save_file(merged, str(directory / "model.safetensors"), metadata={"format": "pt"})
            (directory / "resamplers.safetensors").unlink()
        if with_resampler_config:
            config = json.loads((directory / "config.json").read_text())
            config["resampler_config"] = otr.config.to_dict()
            (directory / "config.json").write_text(json.dumps(config))
    return directory


def all_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out

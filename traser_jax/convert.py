"""Weights in and out: Hugging Face (Qwen2.5-VL / TRASER, safetensors) <-> our orbax checkpoint.

    python -m traser_jax.convert from-hf HF_DIR OUT_DIR [--config traser_3b] [key=value ...]
    python -m traser_jax.convert to-hf CKPT_DIR OUT_DIR [--dtype auto] [--max-shard-size 5GB]

A checkpoint directory (what training and inference load) holds `config.yaml` (our
Config), `params/` (orbax StandardCheckpointer, plain arrays, stacked layers) and
`hf_assets/` (the source's config.json, tokenizer and processor files, verbatim, so
to-hf writes them back). `load_checkpoint(dir)` / `save_checkpoint(dir, cfg, params)`
are the API.

from-hf reads config.json (flat pre-v5 layout or nested text_config), the weights
(model.safetensors, or shards listed in model.safetensors.index.json), the two
resamplers under `otr_resampler.` / `twr_resampler.` (our documented naming; the
released checkpoint may differ: --otr-prefix / --twr-prefix), their shapes from
config.json's `resampler_config` (Idefics2PerceiverConfig fields) when present, else
from the tensors, `traser_tokens` (our TokenConfig) when present, and the ids of
`<obj_traj_start>` / `<obj_traj_end>` from added_tokens.json / tokenizer.json /
tokenizer_config.json. A plain Qwen2.5-VL directory gets freshly initialised
resamplers (said on stderr). to-hf writes config.json (the Qwen2.5-VL config plus
`resampler_config` and `traser_tokens`, the layout traser_jax.torch_reference
reads), the weights in the legacy names below (the ones the published checkpoints
and transformers' save_pretrained use; transformers and the PyTorch reference load
them), sharded past --max-shard-size with an index, and the copied assets.

Tensor map (i = layer; H/KV heads, hd head dim, D text width, Dv vision width, F MLP
width, V vocab, n latents; every transform is an exact transpose/reshape; "[i]" =
slice i of the stacked leading `layers` axis). Also read: `model.visual.*` for
`visual.*` and `model.language_model.*` for `model.*` (transformers >= 5 module names).

| HF tensor                                          | HF shape        | Flax path                                        | Flax shape      | transform            |
|----------------------------------------------------|-----------------|--------------------------------------------------|-----------------|----------------------|
| visual.patch_embed.proj.weight                     | [Dv, C, 2, P, P] | vision/patch_embed                              | [C*2*P*P, Dv]   | reshape(Dv, -1).T    |
| visual.blocks.{i}.norm1.weight                     | [Dv]            | vision/blocks/norm1/scale[i]                     | [Dv]            | -                    |
| visual.blocks.{i}.norm2.weight                     | [Dv]            | vision/blocks/norm2/scale[i]                     | [Dv]            | -                    |
| visual.blocks.{i}.attn.qkv.weight                  | [3*Dv, Dv]      | vision/blocks/qkv/kernel[i]                      | [Dv, 3, H, hd]  | .T, reshape          |
| visual.blocks.{i}.attn.qkv.bias                    | [3*Dv]          | vision/blocks/qkv/bias[i]                        | [3, H, hd]      | reshape              |
| visual.blocks.{i}.attn.proj.weight                 | [Dv, Dv]        | vision/blocks/proj/kernel[i]                     | [H, hd, Dv]     | .T, reshape          |
| visual.blocks.{i}.attn.proj.bias                   | [Dv]            | vision/blocks/proj/bias[i]                       | [Dv]            | -                    |
| visual.blocks.{i}.mlp.gate_proj.weight             | [F, Dv]         | vision/blocks/mlp/gate_proj/kernel[i]            | [Dv, F]         | .T                   |
| visual.blocks.{i}.mlp.gate_proj.bias               | [F]             | vision/blocks/mlp/gate_proj/bias[i]              | [F]             | -                    |
| visual.blocks.{i}.mlp.up_proj.weight               | [F, Dv]         | vision/blocks/mlp/up_proj/kernel[i]              | [Dv, F]         | .T                   |
| visual.blocks.{i}.mlp.up_proj.bias                 | [F]             | vision/blocks/mlp/up_proj/bias[i]                | [F]             | -                    |
| visual.blocks.{i}.mlp.down_proj.weight             | [Dv, F]         | vision/blocks/mlp/down_proj/kernel[i]            | [F, Dv]         | .T                   |
| visual.blocks.{i}.mlp.down_proj.bias               | [Dv]            | vision/blocks/mlp/down_proj/bias[i]              | [Dv]            | -                    |
| visual.merger.ln_q.weight                          | [Dv]            | vision/merger/ln_q/scale                         | [Dv]            | -                    |
| visual.merger.mlp.0.weight                         | [4*Dv, 4*Dv]    | vision/merger/fc1/kernel                         | [4*Dv, 4*Dv]    | .T                   |
| visual.merger.mlp.0.bias                           | [4*Dv]          | vision/merger/fc1/bias                           | [4*Dv]          | -                    |
| visual.merger.mlp.2.weight                         | [D, 4*Dv]       | vision/merger/fc2/kernel                         | [4*Dv, D]       | .T                   |
| visual.merger.mlp.2.bias                           | [D]             | vision/merger/fc2/bias                           | [D]             | -                    |
| model.embed_tokens.weight                          | [V, D]          | llm/embed_tokens/embedding                       | [V, D]          | -                    |
| model.layers.{i}.input_layernorm.weight            | [D]             | llm/layers/input_layernorm/scale[i]              | [D]             | -                    |
| model.layers.{i}.self_attn.q_proj.weight           | [H*hd, D]       | llm/layers/q_proj/kernel[i]                      | [D, H, hd]      | .T, reshape          |
| model.layers.{i}.self_attn.q_proj.bias             | [H*hd]          | llm/layers/q_proj/bias[i]                        | [H, hd]         | reshape              |
| model.layers.{i}.self_attn.k_proj.weight           | [KV*hd, D]      | llm/layers/k_proj/kernel[i]                      | [D, KV, hd]     | .T, reshape          |
| model.layers.{i}.self_attn.k_proj.bias             | [KV*hd]         | llm/layers/k_proj/bias[i]                        | [KV, hd]        | reshape              |
| model.layers.{i}.self_attn.v_proj.weight           | [KV*hd, D]      | llm/layers/v_proj/kernel[i]                      | [D, KV, hd]     | .T, reshape          |
| model.layers.{i}.self_attn.v_proj.bias             | [KV*hd]         | llm/layers/v_proj/bias[i]                        | [KV, hd]        | reshape              |
| model.layers.{i}.self_attn.o_proj.weight           | [D, H*hd]       | llm/layers/o_proj/kernel[i]                      | [H, hd, D]      | .T, reshape          |
| model.layers.{i}.post_attention_layernorm.weight   | [D]             | llm/layers/post_attention_layernorm/scale[i]     | [D]             | -                    |
| model.layers.{i}.mlp.gate_proj.weight              | [F, D]          | llm/layers/mlp/gate_proj/kernel[i]               | [D, F]          | .T                   |
| model.layers.{i}.mlp.up_proj.weight                | [F, D]          | llm/layers/mlp/up_proj/kernel[i]                 | [D, F]          | .T                   |
| model.layers.{i}.mlp.down_proj.weight              | [D, F]          | llm/layers/mlp/down_proj/kernel[i]               | [F, D]          | .T                   |
| model.norm.weight                                  | [D]             | llm/norm/scale                                   | [D]             | -                    |
| lm_head.weight (untied only; tied: embed_tokens)   | [V, D]          | llm/lm_head/kernel                               | [D, V]          | .T                   |
| R.latents                                          | [n, D]          | R/latents                                        | [n, D]          | -                    |
| R.layers.{i}.input_latents_norm.weight             | [D]             | R/layers/input_latents_norm/scale[i]             | [D]             | -                    |
| R.layers.{i}.input_context_norm.weight             | [D]             | R/layers/input_context_norm/scale[i]             | [D]             | -                    |
| R.layers.{i}.self_attn.q_proj.weight               | [H*hd, D]       | R/layers/q_proj/kernel[i]                        | [D, H, hd]      | .T, reshape          |
| R.layers.{i}.self_attn.k_proj.weight               | [KV*hd, D]      | R/layers/k_proj/kernel[i]                        | [D, KV, hd]     | .T, reshape          |
| R.layers.{i}.self_attn.v_proj.weight               | [KV*hd, D]      | R/layers/v_proj/kernel[i]                        | [D, KV, hd]     | .T, reshape          |
| R.layers.{i}.self_attn.o_proj.weight               | [D, H*hd]       | R/layers/o_proj/kernel[i]                        | [H, hd, D]      | .T, reshape          |
| R.layers.{i}.post_attention_layernorm.weight       | [D]             | R/layers/post_attention_layernorm/scale[i]       | [D]             | -                    |
| R.layers.{i}.mlp.gate_proj.weight                  | [4*D, D]        | R/layers/mlp/gate_proj/kernel[i]                 | [D, 4*D]        | .T                   |
| R.layers.{i}.mlp.up_proj.weight                    | [4*D, D]        | R/layers/mlp/up_proj/kernel[i]                   | [D, 4*D]        | .T                   |
| R.layers.{i}.mlp.down_proj.weight                  | [D, 4*D]        | R/layers/mlp/down_proj/kernel[i]                 | [4*D, D]        | .T                   |
| R.norm.weight                                      | [D]             | R/norm/scale                                     | [D]             | -                    |

R = `otr_resampler` / `twr_resampler` (HF prefix `otr_resampler.` / `twr_resampler.`
by default; the Flax roots are always `otr_resampler` / `twr_resampler`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import yaml
from flax import traverse_util
from tqdm import tqdm

from traser_jax import config as config_lib
from traser_jax.config import Config

OTR_PREFIX = "otr_resampler."
TWR_PREFIX = "twr_resampler."
OBJ_TRAJ_START = "<obj_traj_start>"
OBJ_TRAJ_END = "<obj_traj_end>"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ASSETS_DIR = "hf_assets"
ASSET_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken")
NP_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


# -- the tensor map ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One HF tensor <-> one Flax leaf. kind: 'linear1'/'linear2' (HF [out, in] <-> Flax kernel with 1 or 2
    leading input dims), 'vector' (reshape only), 'same', 'conv' (Conv3d weight <-> [patch, Dv] kernel)."""
    hf: str                 # relative to the component prefix; "{i}" = layer index
    flax: tuple[str, ...]   # relative to the component's Flax root
    kind: str
    stacked: bool           # on the leading `layers` axis


def _vision_rules() -> list[Rule]:
    rules = [Rule("patch_embed.proj.weight", ("patch_embed",), "conv", False)]
    for norm in ("norm1", "norm2"):
        rules.append(Rule(f"blocks.{{i}}.{norm}.weight", ("blocks", norm, "scale"), "vector", True))
    rules += [Rule("blocks.{i}.attn.qkv.weight", ("blocks", "qkv", "kernel"), "linear1", True),
              Rule("blocks.{i}.attn.qkv.bias", ("blocks", "qkv", "bias"), "vector", True),
              Rule("blocks.{i}.attn.proj.weight", ("blocks", "proj", "kernel"), "linear2", True),
              Rule("blocks.{i}.attn.proj.bias", ("blocks", "proj", "bias"), "vector", True)]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules += [Rule(f"blocks.{{i}}.mlp.{proj}.weight", ("blocks", "mlp", proj, "kernel"), "linear1", True),
                  Rule(f"blocks.{{i}}.mlp.{proj}.bias", ("blocks", "mlp", proj, "bias"), "vector", True)]
    rules += [Rule("merger.ln_q.weight", ("merger", "ln_q", "scale"), "vector", False),
              Rule("merger.mlp.0.weight", ("merger", "fc1", "kernel"), "linear1", False),
              Rule("merger.mlp.0.bias", ("merger", "fc1", "bias"), "vector", False),
              Rule("merger.mlp.2.weight", ("merger", "fc2", "kernel"), "linear1", False),
              Rule("merger.mlp.2.bias", ("merger", "fc2", "bias"), "vector", False)]
    return rules


def _text_rules() -> list[Rule]:
    rules = [Rule("embed_tokens.weight", ("embed_tokens", "embedding"), "same", False)]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(f"layers.{{i}}.{norm}.weight", ("layers", norm, "scale"), "vector", True))
    for proj in ("q_proj", "k_proj", "v_proj"):
        rules += [Rule(f"layers.{{i}}.self_attn.{proj}.weight", ("layers", proj, "kernel"), "linear1", True),
                  Rule(f"layers.{{i}}.self_attn.{proj}.bias", ("layers", proj, "bias"), "vector", True)]
    rules.append(Rule("layers.{i}.self_attn.o_proj.weight", ("layers", "o_proj", "kernel"), "linear2", True))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"layers.{{i}}.mlp.{proj}.weight", ("layers", "mlp", proj, "kernel"), "linear1", True))
    rules.append(Rule("norm.weight", ("norm", "scale"), "vector", False))
    return rules


def _resampler_rules() -> list[Rule]:
    rules = [Rule("latents", ("latents",), "same", False)]
    for norm in ("input_latents_norm", "input_context_norm", "post_attention_layernorm"):
        rules.append(Rule(f"layers.{{i}}.{norm}.weight", ("layers", norm, "scale"), "vector", True))
    for proj in ("q_proj", "k_proj", "v_proj"):
        rules.append(Rule(f"layers.{{i}}.self_attn.{proj}.weight", ("layers", proj, "kernel"), "linear1", True))
    rules.append(Rule("layers.{i}.self_attn.o_proj.weight", ("layers", "o_proj", "kernel"), "linear2", True))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(f"layers.{{i}}.mlp.{proj}.weight", ("layers", "mlp", proj, "kernel"), "linear1", True))
    rules.append(Rule("norm.weight", ("norm", "scale"), "vector", False))
    return rules


@dataclass(frozen=True)
class Component:
    name: str            # Flax root
    prefix: str          # HF prefix (written form)
    read_prefixes: tuple[str, ...]  # HF prefixes accepted on read, the written one first
    rules: tuple[Rule, ...]
    num_layers: int


def components(cfg: Config, otr_prefix: str = OTR_PREFIX, twr_prefix: str = TWR_PREFIX,
               resamplers: bool = True) -> list[Component]:
    out = [Component("vision", "visual.", ("visual.", "model.visual."), tuple(_vision_rules()), cfg.vision.depth)]
    text = _text_rules()
    out.append(Component("llm", "model.", ("model.", "model.language_model."), tuple(text), cfg.text.num_layers))
    if not cfg.text.tie_word_embeddings:
        out.append(Component("llm", "", ("",), (Rule("lm_head.weight", ("lm_head", "kernel"), "linear1", False),),
                             0))
    if resamplers:
        for name, prefix in (("otr_resampler", otr_prefix), ("twr_resampler", twr_prefix)):
            out.append(Component(name, prefix, (prefix,), tuple(_resampler_rules()), cfg.resampler.depth))
    return out


def _hf_shape(rule: Rule, flax_shape: tuple[int, ...], cfg: Config) -> tuple[int, ...]:
    if rule.kind == "linear1":
        return (math.prod(flax_shape[1:]), flax_shape[0])
    if rule.kind == "linear2":
        return (math.prod(flax_shape[2:]), math.prod(flax_shape[:2]))
    if rule.kind == "vector":
        return (math.prod(flax_shape),)
    if rule.kind == "conv":
        v = cfg.vision
        return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return flax_shape


def _to_flax(rule: Rule, arr: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind in ("linear1", "linear2"):
        return arr.T.reshape(flax_shape)
    if rule.kind == "conv":
        return arr.reshape(arr.shape[0], -1).T.reshape(flax_shape)
    return arr.reshape(flax_shape)


def _to_hf(rule: Rule, arr: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind == "linear1":
        return np.ascontiguousarray(arr.reshape(arr.shape[0], -1).T)
    if rule.kind == "linear2":
        return np.ascontiguousarray(arr.reshape(arr.shape[0] * arr.shape[1], -1).T)
    if rule.kind == "conv":
        return np.ascontiguousarray(arr.T.reshape(hf_shape))
    return np.ascontiguousarray(arr.reshape(hf_shape))


def _np_dtype(name: str) -> Any:
    if name not in NP_DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(NP_DTYPES)}")
    return jax.numpy.dtype(NP_DTYPES[name])


# -- HF directory reading ------------------------------------------------------------------------------

class TensorSource:
    """The tensors of an HF directory (single file or index-sharded), read lazily as numpy."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open
        self._open = safe_open
        self.dir = hf_dir
        index = hf_dir / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = [hf_dir / WEIGHTS_NAME] if (hf_dir / WEIGHTS_NAME).exists() else sorted(
                hf_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{hf_dir}: no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors")
            weight_map = {}
            for f in files:
                with safe_open(f, "np") as handle:
                    weight_map.update({k: f.name for k in handle.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> np.ndarray:
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.dir / file, "np").__enter__()
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _text_cfg(hf: dict) -> dict:
    """The text settings of a Qwen2.5-VL config.json, flat (pre-v5) or nested (text_config)."""
    text = dict(hf)
    text.update(hf.get("text_config") or {})
    return text


def _rope_theta(text: dict) -> float:
    for src in (text.get("rope_parameters") or {}, text.get("rope_scaling") or {}, text):
        if "rope_theta" in src:
            return float(src["rope_theta"])
    return 1_000_000.0


def _check_supported(hf: dict, text: dict) -> None:
    if hf.get("model_type") not in (None, "qwen2_5_vl", "traser"):
        raise ValueError(f"config.json model_type {hf.get('model_type')!r}: expected 'qwen2_5_vl'")
    if text.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true: sliding-window attention is not supported")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"config.json rope type {kind!r}: only default/mrope RoPE is supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act {text.get('hidden_act')!r}: expected 'silu'")


def _read_fields(ours, theirs: dict, names: dict[str, str]) -> None:
    """ours.<field> = theirs[<their name>], cast to the field's type, for every name theirs has."""
    for field, their_name in names.items():
        if their_name in theirs:
            setattr(ours, field, type(getattr(ours, field))(theirs[their_name]))


def config_from_hf(hf: dict, base: Config) -> Config:
    """Our Config with the architecture read from an HF Qwen2.5-VL config.json dict."""
    cfg = copy.deepcopy(base)
    text = _text_cfg(hf)
    _check_supported(hf, text)
    vis = hf.get("vision_config") or {}
    t = cfg.text
    t.vocab_size = int(text["vocab_size"])
    t.hidden_size = int(text["hidden_size"])
    t.num_layers = int(text["num_hidden_layers"])
    t.num_heads = int(text["num_attention_heads"])
    t.num_kv_heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
    t.intermediate_size = int(text["intermediate_size"])
    t.rms_norm_eps = float(text.get("rms_norm_eps", 1e-6))
    t.rope_theta = _rope_theta(text)
    t.max_position_embeddings = int(text.get("max_position_embeddings", t.max_position_embeddings))
    t.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False) or
                                 (hf.get("text_config") or {}).get("tie_word_embeddings", False))
    v = cfg.vision
    _read_fields(v, vis, {name: name for name in (
        "depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "temporal_patch_size",
        "spatial_merge_size", "window_size", "out_hidden_size")})
    v.fullatt_block_indexes = [int(i) for i in vis.get("fullatt_block_indexes", v.fullatt_block_indexes)]
    v.in_channels = int(vis.get("in_channels", vis.get("in_chans", v.in_channels)))
    if vis.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json vision_config.hidden_act {vis.get('hidden_act')!r}: expected 'silu'")
    k = cfg.tokens
    k.vision_start_id = int(hf.get("vision_start_token_id", k.vision_start_id))
    k.vision_end_id = int(hf.get("vision_end_token_id", k.vision_end_id))
    k.video_token_id = int(hf.get("video_token_id", k.video_token_id))
    cfg.resampler.hidden_size = t.hidden_size
    cfg.resampler.intermediate_size = 4 * t.hidden_size
    return cfg


def special_token_ids(hf_dir: Path) -> dict[str, int]:
    """Ids of the TRASER tokens found in the tokenizer files (empty when none is there)."""
    wanted = {OBJ_TRAJ_START, OBJ_TRAJ_END}
    found: dict[str, int] = {}
    added = hf_dir / "added_tokens.json"
    if added.exists():
        found.update({k: int(v) for k, v in json.loads(added.read_text()).items() if k in wanted})
    tok = hf_dir / "tokenizer.json"
    if tok.exists() and wanted - found.keys():
        for entry in json.loads(tok.read_text()).get("added_tokens", []):
            if entry.get("content") in wanted:
                found.setdefault(entry["content"], int(entry["id"]))
    tok_cfg = hf_dir / "tokenizer_config.json"
    if tok_cfg.exists() and wanted - found.keys():
        for idx, entry in (json.loads(tok_cfg.read_text()).get("added_tokens_decoder") or {}).items():
            if entry.get("content") in wanted:
                found.setdefault(entry["content"], int(idx))
    return found


def _resampler_shapes(cfg: Config, src: TensorSource, prefix: str) -> None:
    """Resampler depth, latents, heads from the tensors (head_dim from the config)."""
    r = cfg.resampler
    latents = src.get(prefix + "latents")
    r.num_latents, r.hidden_size = int(latents.shape[0]), int(latents.shape[1])
    layer_ids = {int(m.group(1)) for k in src.keys() if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    r.depth = max(layer_ids) + 1 if layer_ids else 0
    q_rows = src.get(prefix + "layers.0.self_attn.q_proj.weight").shape[0]
    kv_rows = src.get(prefix + "layers.0.self_attn.k_proj.weight").shape[0]
    if q_rows % r.head_dim or kv_rows % r.head_dim:
        raise ValueError(f"{prefix}: q_proj rows {q_rows} / k_proj rows {kv_rows} are not multiples of "
                         f"resampler.head_dim {r.head_dim}; pass resampler.head_dim=... "
                         f"(or add resampler_config to config.json)")
    r.num_heads, r.num_kv_heads = q_rows // r.head_dim, kv_rows // r.head_dim
    r.intermediate_size = int(src.get(prefix + "layers.0.mlp.gate_proj.weight").shape[0])
    # The tensors fix heads x head_dim only: say which split was assumed (it changes the numbers).
    print(f"note: no resampler_config in config.json; resamplers read as depth {r.depth}, {r.num_latents} latents, "
          f"{r.num_heads} heads / {r.num_kv_heads} KV heads of head_dim {r.head_dim} (resampler.head_dim=...)",
          file=sys.stderr)


def perceiver_config(cfg: Config) -> dict[str, Any]:
    """The resampler shapes as transformers' Idefics2PerceiverConfig kwargs."""
    r = cfg.resampler
    if r.intermediate_size != 4 * r.hidden_size:
        raise ValueError(f"resampler.intermediate_size {r.intermediate_size}: Idefics2PerceiverResampler "
                         f"requires 4 x hidden_size = {4 * r.hidden_size}")
    return {"hidden_size": r.hidden_size, "resampler_n_latents": r.num_latents, "resampler_depth": r.depth,
            "resampler_n_heads": r.num_heads, "resampler_head_dim": r.head_dim,
            "num_key_value_heads": r.num_kv_heads, "rms_norm_eps": r.rms_norm_eps, "hidden_act": "silu"}


def _apply_traser_fields(cfg: Config, hf: dict) -> None:
    """config.json's `resampler_config` (Idefics2PerceiverConfig fields) and `traser_tokens` (TokenConfig)."""
    pc = hf.get("resampler_config") or {}
    r = cfg.resampler
    _read_fields(r, pc, {"hidden_size": "hidden_size", "num_latents": "resampler_n_latents",
                         "depth": "resampler_depth", "num_heads": "resampler_n_heads",
                         "head_dim": "resampler_head_dim", "num_kv_heads": "num_key_value_heads",
                         "rms_norm_eps": "rms_norm_eps"})
    r.intermediate_size = 4 * r.hidden_size
    known = {f.name for f in dataclasses.fields(cfg.tokens)}
    for key, value in (hf.get("traser_tokens") or {}).items():
        if key in known:
            setattr(cfg.tokens, key, value)


def hf_to_params(src: TensorSource | Mapping[str, np.ndarray], cfg: Config, *, otr_prefix: str = OTR_PREFIX,
                 twr_prefix: str = TWR_PREFIX, resamplers: bool = True, dtype: str = "float32",
                 ignore_unmapped: bool = False, progress: bool = False) -> dict:
    """Flax params (nested dict of numpy arrays) from HF tensors; every HF tensor must be used."""
    from traser_jax.model import abstract_params
    get = src.get if isinstance(src, TensorSource) else src.__getitem__
    names = set(src.keys())
    rename = {}  # transformers >= 5 module names -> the legacy names the rules use
    for name in names:
        for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
            if name.startswith(new):
                rename[old + name[len(new):]] = name
    for old, new in rename.items():
        names.discard(new)
        names.add(old)
    fetch = lambda name: get(rename.get(name, name))  # noqa: E731
    shapes = traverse_util.flatten_dict(abstract_params(cfg, boxed=False))
    out_dtype = _np_dtype(dtype)
    params, used = {}, set()
    comps = components(cfg, otr_prefix, twr_prefix, resamplers)
    work = [(c, r) for c in comps for r in c.rules]
    for comp, rule in tqdm(work, desc="from-hf", disable=not progress, unit="tensor"):
        path = (comp.name, *rule.flax)
        flax_shape = tuple(shapes[path].shape)
        per_layer = flax_shape[1:] if rule.stacked else flax_shape
        hf_shape = _hf_shape(rule, per_layer, cfg)
        layers = []
        for i in range(comp.num_layers if rule.stacked else 1):
            name = comp.prefix + rule.hf.format(i=i)
            if name not in names:
                raise KeyError(f"HF tensor {name!r} is missing (needed for Flax {'/'.join(path)})")
            arr = np.asarray(fetch(name))
            if tuple(arr.shape) != hf_shape:
                raise ValueError(f"HF tensor {name!r} has shape {tuple(arr.shape)}; the config needs {hf_shape}")
            layers.append(_to_flax(rule, arr, per_layer).astype(out_dtype))
            used.add(name)
        params[path] = np.stack(layers) if rule.stacked else layers[0]
    leftover = sorted(names - used)
    if cfg.text.tie_word_embeddings and "lm_head.weight" in leftover:
        if not np.array_equal(np.asarray(fetch("lm_head.weight")), np.asarray(fetch("model.embed_tokens.weight"))):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
        leftover.remove("lm_head.weight")
    if leftover and not ignore_unmapped:
        shown = ", ".join(leftover[:8]) + (" ..." if len(leftover) > 8 else "")
        raise ValueError(f"{len(leftover)} HF tensors map to nothing: {shown} (wrong --otr-prefix/--twr-prefix? "
                         f"pass --ignore-unmapped to drop them)")
    return traverse_util.unflatten_dict(params)


def params_to_hf(params: Mapping, cfg: Config, *, otr_prefix: str = OTR_PREFIX, twr_prefix: str = TWR_PREFIX,
                 dtype: str | None = None) -> dict[str, np.ndarray]:
    """HF tensors (legacy names) from Flax params; dtype None keeps the params' dtypes."""
    flat = traverse_util.flatten_dict(params)
    has_resamplers = ("otr_resampler", "latents") in flat
    out: dict[str, np.ndarray] = {}
    for comp in components(cfg, otr_prefix, twr_prefix, has_resamplers):
        for rule in comp.rules:
            path = (comp.name, *rule.flax)
            if path not in flat:
                raise KeyError(f"params have no {'/'.join(path)}")
            arr = np.asarray(flat[path])
            if dtype is not None:
                arr = arr.astype(_np_dtype(dtype))
            slices = list(arr) if rule.stacked else [arr]
            for i, piece in enumerate(slices):
                out[comp.prefix + rule.hf.format(i=i)] = _to_hf(rule, piece, _hf_shape(rule, piece.shape, cfg))
    return out


# -- our checkpoint --------------------------------------------------------------------------------------

def save_checkpoint(ckpt_dir: str | Path, cfg: Config, params: Mapping, assets_from: Path | None = None) -> Path:
    """Write config.yaml + params/ (orbax); copy HF assets (config, tokenizer files) when given."""
    import orbax.checkpoint as ocp
    ckpt_dir = Path(ckpt_dir).resolve()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if (ckpt_dir / "params").exists():
        shutil.rmtree(ckpt_dir / "params")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt_dir / "params", jax.tree.map(np.asarray, dict(params)))
    checkpointer.wait_until_finished()
    if assets_from is not None:
        assets = ckpt_dir / ASSETS_DIR
        assets.mkdir(exist_ok=True)
        for f in sorted(assets_from.iterdir()):
            if f.is_file() and f.suffix in ASSET_SUFFIXES and f.name != INDEX_NAME:
                shutil.copy2(f, assets / f.name)
    return ckpt_dir


def load_checkpoint(ckpt_dir: str | Path, shardings: Any = None, dtype: str | None = None) -> tuple[Config, dict]:
    """(Config, params) of a checkpoint directory. `shardings` (a tree of jax.sharding.Sharding matching
    the params) places each array as it is read; `dtype` casts (default: cfg.train.param_dtype)."""
    import orbax.checkpoint as ocp
    ckpt_dir = Path(ckpt_dir).resolve()
    if not (ckpt_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{ckpt_dir}: no config.yaml (not a checkpoint written by save_checkpoint)")
    cfg = config_lib.load(ckpt_dir / "config.yaml")
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(ckpt_dir / "params").item_metadata.tree
    want = _np_dtype(dtype or cfg.train.param_dtype)
    if shardings is None:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, want), meta,
                              is_leaf=lambda x: hasattr(x, "shape"))
    else:
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, want, sharding=s), meta, shardings,
                              is_leaf=lambda x: hasattr(x, "shape"))
    return cfg, checkpointer.restore(ckpt_dir / "params", target)


# -- HF directory writing --------------------------------------------------------------------------------

PUBLISHED_CONFIG = {  # Qwen2.5-VL-3B-Instruct's config.json: the template when no source config is kept
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "image_token_id": 151655, "initializer_range": 0.02, "max_window_layers": 70, "sliding_window": 32768,
    "use_cache": True, "use_sliding_window": False, "vision_token_id": 151654, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"hidden_act": "silu", "tokens_per_second": 2, "model_type": "qwen2_5_vl_vision"},
}


def _mrope_section(head_dim: int, current: Sequence[int] | None) -> list[int]:
    """M-RoPE band split (unused by TRASER's 1-D positions but required by HF); keep a valid one."""
    if current and sum(current) == head_dim // 2:
        return list(current)
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def hf_config(cfg: Config, base: dict | None = None, dtype: str | None = None) -> dict:
    """config.json for Qwen2_5_VLForConditionalGeneration: `base` (the source's, kept in hf_assets) or the
    published template, with every architecture field set from cfg, in the base's layout (flat or nested)."""
    out = copy.deepcopy(base if base is not None else PUBLISHED_CONFIG)
    t, v, k = cfg.text, cfg.vision, cfg.tokens
    nested = isinstance(out.get("text_config"), dict)
    text = out["text_config"] if nested else out
    text.update(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                intermediate_size=t.intermediate_size, rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings, hidden_act="silu")
    if "layer_types" in text:
        text["layer_types"] = ["full_attention"] * t.num_layers
    rope_key = "rope_parameters" if "rope_parameters" in text else "rope_scaling"
    rope = dict(text.get(rope_key) or {})
    rope["mrope_section"] = _mrope_section(t.hidden_size // t.num_heads, rope.get("mrope_section"))
    if rope_key == "rope_parameters":
        rope["rope_theta"] = t.rope_theta
    else:
        text["rope_theta"] = t.rope_theta
    text[rope_key] = rope
    out["tie_word_embeddings"] = t.tie_word_embeddings
    if nested and "tie_word_embeddings" in text:
        text["tie_word_embeddings"] = t.tie_word_embeddings
    vis = out.setdefault("vision_config", {})
    vis.update(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads,
               intermediate_size=v.intermediate_size, patch_size=v.patch_size,
               temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
               window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
               out_hidden_size=v.out_hidden_size, in_channels=v.in_channels)
    if "in_chans" in vis:
        vis["in_chans"] = v.in_channels
    if "spatial_patch_size" in vis:
        vis["spatial_patch_size"] = v.patch_size
    out.update(vision_start_token_id=k.vision_start_id, vision_end_token_id=k.vision_end_id,
               video_token_id=k.video_token_id)
    if dtype is not None:
        out["torch_dtype" if "torch_dtype" in out or "dtype" not in out else "dtype"] = dtype
    return out


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 1000000")
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, None: 1}[m.group(2)]
    return int(float(m.group(1)) * scale)


def write_safetensors(out_dir: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int,
                      progress: bool = False) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index past max_shard_bytes."""
    from safetensors.numpy import save_file
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in tensors:  # greedy, in the given order (layer-major)
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        return [WEIGHTS_NAME]
    names, weight_map = [], {}
    for i, shard in enumerate(tqdm(shards, desc="to-hf shards", disable=not progress), start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        names.append(fname)
    total = sum(t.nbytes for t in tensors.values())
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    return names


# -- the two commands ------------------------------------------------------------------------------------

def from_hf(hf_dir: str | Path, out_dir: str | Path, *, preset: str = "traser_3b",
            overrides: Sequence[str] = (), otr_prefix: str = OTR_PREFIX, twr_prefix: str = TWR_PREFIX,
            dtype: str | None = None, ignore_unmapped: bool = False, progress: bool = True) -> tuple[Config, dict]:
    """HF dir -> our checkpoint. Returns (cfg, params)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"{hf_dir}: no config.json")
    hf = json.loads((hf_dir / "config.json").read_text())
    cfg = config_from_hf(hf, config_lib.load(preset, list(overrides)))
    src = TensorSource(hf_dir)
    try:
        has = [any(k.startswith(p) for k in src.keys()) for p in (otr_prefix, twr_prefix)]
        if has[0] != has[1]:
            raise ValueError(f"{hf_dir}: found only one resampler ({otr_prefix!r}: {has[0]}, "
                             f"{twr_prefix!r}: {has[1]})")
        resamplers = has[0]
        _apply_traser_fields(cfg, hf)
        if resamplers and "resampler_config" not in hf:
            _resampler_shapes(cfg, src, otr_prefix)
        ids = special_token_ids(hf_dir)
        if OBJ_TRAJ_START in ids:
            cfg.tokens.obj_traj_start_id = ids[OBJ_TRAJ_START]
        if OBJ_TRAJ_END in ids:
            cfg.tokens.obj_traj_end_id = ids[OBJ_TRAJ_END]
        if len(ids) < 2 and "traser_tokens" not in hf:
            print(f"note: {OBJ_TRAJ_START}/{OBJ_TRAJ_END} not in the tokenizer files of {hf_dir}; keeping ids "
                  f"{cfg.tokens.obj_traj_start_id}/{cfg.tokens.obj_traj_end_id} from the config", file=sys.stderr)
        if dtype is not None:
            cfg.train.param_dtype = dtype
        params = hf_to_params(src, cfg, otr_prefix=otr_prefix, twr_prefix=twr_prefix, resamplers=resamplers,
                              dtype=cfg.train.param_dtype, ignore_unmapped=ignore_unmapped, progress=progress)
    finally:
        src.close()
    if not resamplers:
        from traser_jax.model import init_resamplers
        print(f"note: {hf_dir} has no resamplers ({otr_prefix}*, {twr_prefix}*): initialising both at random "
              f"(seed {cfg.train.seed})", file=sys.stderr)
        fresh = init_resamplers(cfg, jax.random.key(cfg.train.seed))
        params.update(jax.tree.map(lambda a: np.asarray(a, _np_dtype(cfg.train.param_dtype)), fresh))
    save_checkpoint(out_dir, cfg, params, assets_from=hf_dir)
    return cfg, params


def to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto", max_shard_size: str = "5GB",
          otr_prefix: str = OTR_PREFIX, twr_prefix: str = TWR_PREFIX, progress: bool = True) -> Path:
    """Our checkpoint -> HF dir (config.json, traser_config.json, safetensors, the kept assets)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    cfg, params = load_checkpoint(ckpt_dir, dtype=None)
    assets = ckpt_dir / ASSETS_DIR
    base = json.loads((assets / "config.json").read_text()) if (assets / "config.json").exists() else None
    if dtype == "auto":
        source = (base or {}).get("torch_dtype") or (base or {}).get("dtype")
        dtype = source if source in NP_DTYPES else cfg.train.param_dtype
    params = jax.tree.map(np.asarray, params)
    tensors = params_to_hf(params, cfg, otr_prefix=otr_prefix, twr_prefix=twr_prefix, dtype=dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    if assets.exists():
        for f in sorted(assets.iterdir()):
            shutil.copy2(f, out_dir / f.name)
    config_json = hf_config(cfg, base, dtype)
    config_json["resampler_config"] = perceiver_config(cfg)
    config_json["traser_tokens"] = dataclasses.asdict(cfg.tokens)
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    for stale in [out_dir / WEIGHTS_NAME, out_dir / INDEX_NAME, *out_dir.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    write_safetensors(out_dir, tensors, _parse_size(max_shard_size), progress=progress)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traser_jax.convert",
                                     description="Hugging Face <-> TRASER-JAX checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    p_in = sub.add_parser("from-hf", help="HF Qwen2.5-VL / TRASER directory -> our checkpoint")
    p_in.add_argument("hf_dir")
    p_in.add_argument("out_dir")
    p_in.add_argument("--config", default="traser_3b", help="preset for the non-architecture settings")
    p_in.add_argument("--dtype", choices=sorted(NP_DTYPES), help="stored dtype (default: train.param_dtype)")
    p_in.add_argument("--ignore-unmapped", action="store_true", help="drop HF tensors that map to nothing")
    p_out = sub.add_parser("to-hf", help="our checkpoint -> HF directory")
    p_out.add_argument("ckpt_dir")
    p_out.add_argument("out_dir")
    p_out.add_argument("--dtype", default="auto", choices=["auto", *sorted(NP_DTYPES)],
                       help="auto: the source config.json's dtype, else the stored one")
    p_out.add_argument("--max-shard-size", default="5GB")
    for p in (p_in, p_out):
        p.add_argument("--otr-prefix", default=OTR_PREFIX)
        p.add_argument("--twr-prefix", default=TWR_PREFIX)
    p_in.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. resampler.head_dim=96)")
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "from-hf" or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "from-hf":
        overrides = [*args.overrides, *extra]  # key=value items may come after the options too
        cfg, params = from_hf(args.hf_dir, args.out_dir, preset=args.config, overrides=overrides,
                              otr_prefix=args.otr_prefix, twr_prefix=args.twr_prefix, dtype=args.dtype,
                              ignore_unmapped=args.ignore_unmapped)
        count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
        print(f"wrote {args.out_dir}: {count:,} parameters, {cfg.train.param_dtype}", file=sys.stderr)
    else:
        out = to_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    otr_prefix=args.otr_prefix, twr_prefix=args.twr_prefix)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

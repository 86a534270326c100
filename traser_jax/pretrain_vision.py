"""A pretrained vision tower for runs that start from scratch (the demo's stage 0).

    python -m traser_jax.pretrain_vision CONFIG [--data TRAIN_DIR] [--catalog N] --out DIR [--eval-data DIR]
        [--steps 400] [--batch 128] [--lr 1e-3] [--crop 56] [--jitter 0.25] [--seed 0] [--center]
        [--init-tower TOWER.npz] [--windows] [key=value ...]
    python -m traser_jax.pretrain_vision CONFIG --from-tower TOWER.npz --out DIR [key=value ...]

The published TRASER starts from Qwen2.5-VL's vision tower, pretrained on web-scale data, and
freezes it. A tower trained from scratch inside the scene-graph loss, as the demo's would be,
stays near chance on what objects look like within a CPU budget (README, "What the demo
learns"). This stage is the cheap stand-in: the config's vision tower (with its merger) learns
to name each object of the training shards and its attributes from a crop around it, through
linear heads on the mean of the crop's merged tokens, many crops per step. The output is a
checkpoint in `convert.save_checkpoint`'s layout, holding that tower and fresh random
parameters for everything else, to start training from (`train.init_from=DIR
optim.lr_vision=0`).

Crops: for every object and every temporal patch (sampled frames 2i, 2i + 1) where the object is
visible in frame 2i, a `crop` x `crop` window of the resized frames (the size the tower sees in
training) around the object's mask centroid, shifted by a random offset of up to `jitter` crops
(a quarter by default; README, crop probes, for an eighth) and clipped to the frame. Labels come
from the records alone: the object's name (one softmax over the training names) and its
attributes (one sigmoid per attribute string seen in training). Reported: name accuracy, and
attribute recall (of an object's k attributes, the share among the head's top k).

`--catalog N` adds N crops of the toyworld object catalog (`data_gen.toyworld.catalog`: single
objects drawn as the scenes draw them, without a video; cheaper per crop than a video's and never
the same object twice), cut as above from frames of `tokens.frame_size`; the vocabularies are then
toyworld's. Without `--data` the tower learns from the catalog alone.

`--windows` trains on what the object resampler reads instead: for every selected object of the
shards and temporal patch, the tower's attention windows holding its selected cells, the heads on the
mean of those cells' tokens (`object_windows`). A crop centers its object; in a frame an object lies
across fixed windows, each seeing a part of it (README, session 13: 1,500 steps of this on the demo's
crop-trained tower raised the share of held-out objects its resampler names from 47% to 68%).
`--init-tower` starts from a saved tower, `--center` centers the tokens at the end (`center_tower`).
Every run also writes the tower alone (`tower.npz`, `save_tower`); `--from-tower` writes the
checkpoint from such a file without training.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from traser_jax import config as config_lib
from traser_jax.config import Config, VisionConfig
from traser_jax.modules.layers import dtype_of
from traser_jax.modules.vision import VisionTower
from traser_jax.video_input import normalize, patchify, resize_frames, resized_size

if TYPE_CHECKING:
    from data_gen.toyworld import ToyworldConfig

REPORT_NAME = "pretrain_vision.json"  # written last: its presence means the stage finished
TOWER_NAME = "tower.npz"  # the tower alone, to start other runs from (`--from-tower`)


@dataclass
class Crops:
    pixel_values: np.ndarray  # float32 [N, patches per crop, patch dim]
    names: np.ndarray  # int [N]: index into the name vocabulary, -1 when not in it
    attributes: np.ndarray  # float32 [N, num attributes]: 1 where the object has the attribute
    boxes: np.ndarray  # int [N, 4]: (video index in the shards, first frame, y0, x0) of each crop


CATALOG_CHUNK = 250  # catalog crops a worker makes per task


@dataclass(frozen=True)
class CatalogChunk:
    """Catalog crops `start`..`start + chunk - 1` (up to `count`), hidden objects dropped, as
    (patchified pixels [n, patches, patch dim], [(name, attributes)] * n): one task of a grain worker."""
    vision: VisionConfig
    toyworld: ToyworldConfig
    crop: int
    count: int
    seed: int
    jitter: float
    frame_size: tuple[int, int]
    chunk: int  # crops per task (CATALOG_CHUNK)

    def __call__(self, start: int) -> tuple[np.ndarray, list[tuple[str, list[str]]]]:
        from data_gen.toyworld.catalog import catalog_crop

        pixels, objects, v = [], [], self.vision
        for index in range(start, min(start + self.chunk, self.count)):
            item = catalog_crop(self.seed, index, self.crop, self.frame_size, self.jitter, config=self.toyworld)
            if item.mask.any():
                window = normalize(resize_frames(item.frames, self.crop, self.crop))
                pixels.append(patchify(window, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)[0])
                objects.append((item.name, item.attributes))
        if not pixels:  # every object of the chunk hidden
            patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
            return np.zeros((0, (self.crop // v.patch_size) ** 2, patch_dim), np.float32), objects
        return np.stack(pixels), objects


def catalog_crops(cfg: Config, crop: int, count: int, seed: int, jitter: float, names: list[str],
                  attributes: list[str], knobs: dict | None = None) -> Crops:
    """`count` crops of the toyworld object catalog (data_gen.toyworld.catalog, catalog `seed`, frame
    sides from the toyworld `knobs`), resized to crop x crop as `object_crops` sees the frames; crops
    whose object is hidden are dropped. Labels index `names` and `attributes`. Made in
    `data.worker_count` processes, in index order: the same crops for any worker count."""
    import grain
    from tqdm import tqdm

    from data_gen.toyworld import ToyworldConfig
    from traser_jax.data import in_workers

    if len(cfg.tokens.frame_size) != 2:
        raise ValueError("--catalog needs tokens.frame_size (the frame size the crops are cut from)")
    frame_size = (int(cfg.tokens.frame_size[0]), int(cfg.tokens.frame_size[1]))
    make = CatalogChunk(cfg.vision, ToyworldConfig.from_knobs(**(knobs or {})), crop, count, seed, jitter, frame_size,
                        CATALOG_CHUNK)
    starts = range(0, count, make.chunk)
    workers = cfg.data.worker_count if len(starts) > 1 else 0  # one chunk: not worth starting processes
    pixels, crop_objects = [], []  # crop_objects: (name, attributes) of each crop's object
    chunks = in_workers(grain.MapDataset.source(starts).map(make), workers)
    with tqdm(total=count, desc="object catalog", unit="crop", file=sys.stderr, mininterval=2) as bar:
        for start, (chunk_pixels, chunk_objects) in zip(starts, chunks):
            pixels.append(np.array(chunk_pixels))  # a copy: the worker's output may live in shared memory
            crop_objects += chunk_objects
            bar.update(min(make.chunk, count - start))
    boxes = np.full((len(crop_objects), 4), -1)  # not cut from a shard video
    return Crops(np.concatenate(pixels), *label_rows(crop_objects, names, attributes), boxes)


def label_rows(crop_objects: list[tuple[str, list[str]]], names: list[str], attributes: list[str]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(index of each (name, attributes) pair's name in `names`, -1 when absent; float32 multi-hot rows over
    `attributes`): the crops' labels."""
    name_index, attr_index = {n: i for i, n in enumerate(names)}, {a: i for i, a in enumerate(attributes)}
    labels = np.asarray([name_index.get(name, -1) for name, _ in crop_objects], np.int64)
    multi_hot = np.zeros((len(crop_objects), len(attributes)), np.float32)
    for row, (_, attrs) in enumerate(crop_objects):
        multi_hot[row, [attr_index[a] for a in attrs if a in attr_index]] = 1.0
    return labels, multi_hot


def object_crops(shard_dir: str | Path, cfg: Config, crop: int, rng: np.random.Generator,
                 names: list[str] | None = None, attributes: list[str] | None = None, jitter: float = 0.25
                 ) -> tuple[Crops, list[str], list[str]]:
    """Crops of every shard video's objects (module doc) and the label vocabularies: taken from
    these records unless given (the training ones, when reading held-out shards). One pass over the
    shards; only the crops are kept."""
    from data_gen import rle as rle_lib
    from data_gen.shards import ShardReader

    vision = cfg.vision
    cell = vision.patch_size * vision.spatial_merge_size
    if crop <= 0 or crop % cell:
        raise ValueError(f"crop {crop} must be a positive multiple of patch_size x spatial_merge_size = {cell}")
    pixels, boxes, crop_objects = [], [], []  # crop_objects: (name, attributes) of each crop's object
    seen_names, seen_attributes = set(), set()
    for video, ex in enumerate(ShardReader(shard_dir)):
        frames = np.asarray(ex.frames)
        height, width = frames.shape[1:3]
        h, w = resized_size(height, width, vision, cfg.tokens)
        if crop > min(h, w):
            raise ValueError(f"crop {crop} is larger than the resized frames ({h}x{w})")
        small = normalize(resize_frames(frames, h, w))  # float32 [T, C, h, w]
        for obj in ex.record.objects:
            seen_names.add(obj.name)
            seen_attributes.update(obj.attributes)
            for t in range(0, len(frames), vision.temporal_patch_size):
                ys, xs = np.nonzero(rle_lib.decode(obj.masks[t]))
                if len(ys) == 0:
                    continue
                cy = (ys.mean() + 0.5) * h / height + rng.uniform(-jitter * crop, jitter * crop)
                cx = (xs.mean() + 0.5) * w / width + rng.uniform(-jitter * crop, jitter * crop)
                y0 = int(np.clip(round(cy - crop / 2), 0, h - crop))
                x0 = int(np.clip(round(cx - crop / 2), 0, w - crop))
                # a last frame without a pair is repeated by patchify, as the processor does
                window = small[t:t + vision.temporal_patch_size, :, y0:y0 + crop, x0:x0 + crop]
                pixels.append(patchify(window, vision.patch_size, vision.temporal_patch_size,
                                       vision.spatial_merge_size)[0])
                boxes.append((video, t, y0, x0))
                crop_objects.append((obj.name, obj.attributes))
    if not pixels:
        raise ValueError(f"{shard_dir}: no object is visible in any sampled frame")
    names = names if names is not None else sorted(seen_names)
    attributes = attributes if attributes is not None else sorted(seen_attributes)
    return Crops(np.stack(pixels), *label_rows(crop_objects, names, attributes), np.asarray(boxes)), names, attributes


def heads(pooled: jax.Array, num_names: int, num_attributes: int) -> tuple[jax.Array, jax.Array]:
    """(name logits, attribute logits): the linear heads the pretraining classifiers end in (`fit_heads` trains
    them); called inside a module's compact method, they are that module's `name_head` and `attribute_head`."""
    return nn.Dense(num_names, name="name_head")(pooled), nn.Dense(num_attributes, name="attribute_head")(pooled)


@dataclass
class ObjectWindows:
    """Per object and temporal patch: the tower's attention windows its selected cells lie in."""
    pixel_values: np.ndarray  # float16 [N, max windows, patches per window, patch dim]; unused windows zero
    cells: np.ndarray  # bool [N, max windows, merged cells per window]: the object's selected cells in each
    names: np.ndarray  # int [N] (label_rows')
    attributes: np.ndarray  # float32 [N, num attributes]


def cells_by_window(ys: np.ndarray, xs: np.ndarray, side: int, grid_h: int, grid_w: int
                    ) -> dict[tuple[int, int], list[int]]:
    """Merged cells (ys, xs) of a grid_h x grid_w grid grouped by the side x side window they lie in:
    window (row, column) -> the cells' indices inside it, row-major. Windows the grid's edge cuts off
    are left out."""
    in_window: dict[tuple[int, int], list[int]] = {}
    for y, x in zip(ys, xs):
        wy, wx = y // side, x // side
        if (wy + 1) * side <= grid_h and (wx + 1) * side <= grid_w:
            in_window.setdefault((int(wy), int(wx)), []).append(int((y % side) * side + x % side))
    return in_window


def object_windows(shard_dir: str | Path, cfg: Config, names: list[str] | None = None,
                   attributes: list[str] | None = None, max_windows: int = 4, progress: bool = True
                   ) -> tuple[ObjectWindows, list[str], list[str]]:
    """Every selected object of the shards, per temporal patch, as the windows its cells (`tokens.select_from_record`,
    as training selects them) lie in: the `max_windows` holding the most of them, windows cut off by the frame's
    edge left out. Without full-attention blocks each window's tokens depend on its pixels alone, so the tower
    on these windows computes the object's tokens as on the whole frame. Vocabularies as `object_crops`'."""
    from tqdm import tqdm

    from data_gen.shards import ShardReader
    from traser_jax import tokens as tokens_lib

    v = cfg.vision
    cell = v.patch_size * v.spatial_merge_size
    if v.fullatt_block_indexes or v.window_size % cell:
        raise ValueError(f"object windows need a tower of windows alone (vision.fullatt_block_indexes "
                         f"{v.fullatt_block_indexes}) whose window_size {v.window_size} is a multiple of {cell}")
    side = v.window_size // cell  # merged cells per window side
    pixels, cells, labels = [], [], []
    reader = ShardReader(shard_dir)
    for ex in tqdm(reader, desc=f"object windows {Path(shard_dir).name}", disable=not progress, file=sys.stderr):
        frames = np.asarray(ex.frames)
        h, w = resized_size(frames.shape[1], frames.shape[2], v, cfg.tokens)
        small = normalize(resize_frames(frames, h, w))
        if len(small) % v.temporal_patch_size:  # a last frame without a pair is repeated, as patchify does
            small = np.concatenate([small, small[-1:]])
        grid_h, grid_w = h // cell, w // cell
        by_id = {o.id: o for o in ex.record.objects}
        selection = tokens_lib.select_from_record(ex.record, v, cfg.tokens)
        for object_id, index in zip(selection.object_ids, selection.object_tokens):
            t_index, rest = np.divmod(index, grid_h * grid_w)
            ys, xs = np.divmod(rest, grid_w)
            for t in np.unique(t_index):
                in_window = cells_by_window(ys[t_index == t], xs[t_index == t], side, grid_h, grid_w)
                if not in_window:
                    continue
                kept = sorted(in_window, key=lambda k: -len(in_window[k]))[:max_windows]
                window_pixels = np.zeros((max_windows, (v.window_size // v.patch_size) ** 2,
                                          v.in_channels * v.temporal_patch_size * v.patch_size ** 2), np.float16)
                window_cells = np.zeros((max_windows, side * side), bool)
                for j, (wy, wx) in enumerate(kept):
                    y0, x0, t0 = wy * v.window_size, wx * v.window_size, int(t) * v.temporal_patch_size
                    window = small[t0:t0 + v.temporal_patch_size, :, y0:y0 + v.window_size, x0:x0 + v.window_size]
                    window_pixels[j] = patchify(window, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)[0]
                    window_cells[j, in_window[(wy, wx)]] = True
                pixels.append(window_pixels)
                cells.append(window_cells)
                obj = by_id[int(object_id)]
                labels.append((obj.name, list(obj.attributes)))
    if not labels:
        raise ValueError(f"{shard_dir}: no selected object in a whole window")
    names = names if names is not None else sorted({name for name, _ in labels})
    attributes = attributes if attributes is not None else sorted({a for _, attrs in labels for a in attrs})
    return ObjectWindows(np.stack(pixels), np.stack(cells), *label_rows(labels, names, attributes)), names, attributes


class WindowClassifier(nn.Module):
    """The vision tower on one object's windows -> (name logits, attribute logits) from the mean of the object's
    merged tokens in them: what the object resampler reads of it in that temporal patch."""
    cfg: Config
    num_names: int
    num_attributes: int

    @nn.compact
    def __call__(self, pixel_values: jax.Array, cells: jax.Array):
        cfg = self.cfg
        side = cfg.vision.window_size // cfg.vision.patch_size
        tower = VisionTower(cfg.vision, dtype=dtype_of(cfg.train.compute_dtype), attention_impl=cfg.train.attention_impl,
                            name="vision")
        tokens = jax.vmap(lambda x: tower(x.astype(jnp.float32), ((1, side, side),)))(pixel_values)  # [W, cells, D]
        weight = cells.astype(jnp.float32)[..., None]
        pooled = (tokens.astype(jnp.float32) * weight).sum((0, 1)) / jnp.maximum(weight.sum((0, 1)), 1.0)
        return heads(pooled, self.num_names, self.num_attributes)


class CropClassifier(nn.Module):
    """The vision tower on one crop -> (name logits, attribute logits) from its mean merged token."""
    cfg: Config
    num_names: int
    num_attributes: int
    crop: int  # side in pixels

    @nn.compact
    def __call__(self, pixel_values: jax.Array):
        cfg = self.cfg
        side = self.crop // cfg.vision.patch_size
        tokens = VisionTower(cfg.vision, dtype=dtype_of(cfg.train.compute_dtype), attention_impl=cfg.train.attention_impl,
                             name="vision")(pixel_values, ((1, side, side),))
        pooled = tokens.astype(jnp.float32).mean(0)
        return heads(pooled, self.num_names, self.num_attributes)


def crop_losses(name_logits, attr_logits, names, attributes):
    """(mean name cross-entropy over labelled crops, attribute binary cross-entropy summed over the
    attributes and averaged over crops: a mean over a large attribute vocabulary would shrink the
    gradient of each attribute an object has)."""
    known = names >= 0
    name_ce = optax.softmax_cross_entropy_with_integer_labels(name_logits, jnp.maximum(names, 0))
    name_loss = jnp.sum(jnp.where(known, name_ce, 0.0)) / jnp.maximum(known.sum(), 1)
    return name_loss, optax.sigmoid_binary_cross_entropy(attr_logits, attributes).sum(-1).mean()


def scores(name_logits: np.ndarray, attr_logits: np.ndarray, names: np.ndarray, attributes: np.ndarray
           ) -> dict[str, float]:
    """Name accuracy (over rows with a known name) and attribute recall at each row's own k (`label_rows`' labels)."""
    known = names >= 0
    accuracy = float((name_logits.argmax(-1) == names)[known].mean()) if known.any() else float("nan")
    ranks = np.argsort(-attr_logits, axis=-1)
    hits = total = 0
    for row, truth in zip(ranks, attributes):
        k = int(truth.sum())
        hits += int(truth[row[:k]].sum())
        total += k
    return {"name_accuracy": accuracy, "attribute_recall": hits / total if total else float("nan")}


def fit_heads(params: dict, apply, inputs: tuple[np.ndarray, ...], names: np.ndarray, attributes: np.ndarray, *,
              steps: int, batch: int, lr: float, rng: np.random.Generator, desc: str, progress: bool = True
              ) -> tuple[dict, list[float]]:
    """(params, losses) after `steps` steps on `crop_losses` of apply(p, *rows) -> (name logits, attribute logits),
    each step on `batch` random rows of `inputs` and their labels (`label_rows`'): AdamW with warmup and
    cosine decay, gradients clipped at norm 1. The tower's pretraining and the object resampler's share it."""
    from tqdm import tqdm

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

    def loss_fn(p, rows, names_, attributes_):
        name_loss, attr_loss = crop_losses(*apply(p, *rows), names_, attributes_)
        return name_loss + attr_loss

    @jax.jit
    def step(p, opt_state, rows, names_, attributes_):
        loss, grads = jax.value_and_grad(loss_fn)(p, rows, names_, attributes_)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr)
    for _ in bar:
        idx = rng.choice(len(names), size=batch, replace=len(names) < batch)
        params, opt_state, loss = step(params, opt_state, tuple(x[idx] for x in inputs), names[idx], attributes[idx])
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if not np.isfinite(losses[-1]):
        raise RuntimeError(f"{desc}: the loss is {losses[-1]} after {steps} steps")
    return params, losses


def score_heads(predict, params: dict, inputs: tuple[np.ndarray, ...], names: np.ndarray, attributes: np.ndarray,
                chunk: int = 512) -> dict[str, float]:
    """`scores` of predict(params, *rows) -> (name logits, attribute logits) over every row, `chunk` at a time."""
    outs = [predict(params, *(x[i:i + chunk] for x in inputs)) for i in range(0, len(names), chunk)]
    return scores(np.concatenate([np.asarray(o[0]) for o in outs]),
                  np.concatenate([np.asarray(o[1]) for o in outs]), names, attributes)


def tower_encoder(cfg: Config):
    """jit of (vision params, pixel values, grid) -> the tower's merged output tokens [tokens, D] for one video."""
    from traser_jax.model import Traser

    model = Traser(cfg)
    return jax.jit(lambda p, x, grid: model.apply({"params": {"vision": p}}, x, (grid,), method=Traser.encode_video),
                   static_argnums=2)


def center_tower(cfg: Config, vision_params: dict, shard_dir: str | Path, videos: int = 256) -> tuple[dict, dict]:
    """(the tower with the mean of its output tokens over the first `videos` videos of the shards folded
    into the merger's last bias, {videos used, RMS of that mean}). The same function with centered tokens: a
    shared vector in every token is most of a small tower's output energy, and the resamplers read
    centered tokens faster (README, "What the demo learns", session 10)."""
    from data_gen.shards import ShardReader
    from traser_jax.data import video_features

    encode = tower_encoder(cfg)
    total, count, used = 0.0, 0, 0
    for example in ShardReader(shard_dir):
        if used == videos:
            break
        used += 1
        pixel_values, grid = video_features(example.record, example.frames, cfg)
        out = np.asarray(encode(vision_params, jnp.asarray(pixel_values), tuple(int(g) for g in grid)), np.float64)
        total, count = total + out.sum(0), count + len(out)
    if not count:
        raise ValueError(f"no video in {shard_dir} to center the tower on")
    mean = total / count
    centered = jax.tree.map(np.asarray, vision_params)
    fc2 = dict(centered["merger"]["fc2"])
    fc2["bias"] = (fc2["bias"].astype(np.float64) - mean).astype(fc2["bias"].dtype)
    centered["merger"] = {**centered["merger"], "fc2": fc2}
    return centered, {"videos": used, "removed_mean_rms": float(np.sqrt((mean ** 2).mean()))}


def save_tower(path: str | Path, vision_params: dict, report: dict) -> None:
    """The tower's parameters in float16 (half the bytes; `load_tower` casts back), and its report next to it (.json)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(jax.device_get(vision_params), sep="/")
    half = {key: np.asarray(value, np.float16) for key, value in flat.items()}
    for key, value in half.items():
        if not np.isfinite(value).all():
            raise ValueError(f"tower parameter {key} does not fit float16")
    path = Path(path)
    np.savez_compressed(path, **half)
    path.with_suffix(".json").write_text(json.dumps(report, indent=1))


def load_tower(path: str | Path, cfg: Config) -> dict:
    """`save_tower`'s tower as float32 parameters, checked against the config's vision tower."""
    from flax import traverse_util

    from traser_jax.model import abstract_params, shape_mismatch

    with np.load(path) as npz:
        tower = traverse_util.unflatten_dict({tuple(key.split("/")): np.asarray(npz[key], np.float32)
                                              for key in npz.files})
    mismatch = shape_mismatch(abstract_params(cfg, boxed=False)["vision"], tower)
    if mismatch:
        name, shape_got, shape_want = mismatch
        raise ValueError(f"{path}: tower parameter {name} has shape {shape_got}, the config's vision tower needs "
                         f"{shape_want} (the tower was trained with other vision.* settings)")
    return tower


def checkpoint_from_tower(cfg: Config, tower_path: str | Path, out_dir: str | Path, seed: int = 0) -> dict:
    """Write what `pretrain` writes, with the tower of `tower_path` (`save_tower`'s) in place of training one;
    return the report: the tower's own, with where it came from."""
    from traser_jax.convert import save_checkpoint
    from traser_jax.model import init_params

    tower = load_tower(tower_path, cfg)
    tower_report = Path(tower_path).with_suffix(".json")
    report = {"from_tower": str(tower_path),
              **(json.loads(tower_report.read_text()) if tower_report.exists() else {})}
    full = dict(init_params(cfg, jax.random.key(seed)))
    full["vision"] = tower
    out_dir = Path(out_dir)
    save_checkpoint(out_dir, cfg, full)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    return report


def pretrain(cfg: Config, train_dir: str | Path | None, out_dir: str | Path, *, eval_dir: str | Path | None = None,
             steps: int = 400, batch: int = 128, lr: float = 1e-3, crop: int = 56, jitter: float = 0.25,
             seed: int = 0, catalog: int = 0, knobs: dict | None = None, center: bool = False,
             windows: bool = False, init_tower: str | Path | None = None, progress: bool = True) -> dict:
    """Train the tower on crops (module doc) of the shards in train_dir and `catalog` crops of the
    toyworld object catalog (catalog seed = seed, toyworld `knobs`), or with `windows` on each object's
    windows in the frames (`object_windows`: what the object resampler reads, where a crop centers the
    object); from `init_tower` (`save_tower`'s) when given. With `center`, center its tokens on train_dir's
    videos (`center_tower`; the reported scores are the uncentered tower's, with its heads); write the
    checkpoint, the tower alone (`save_tower`) and the report; return the report."""
    from traser_jax.convert import save_checkpoint
    from traser_jax.model import init_params

    if center and train_dir is None:
        raise ValueError("centering the tower needs training shards (--data) to take the mean over")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps {steps} and batch {batch} must be at least 1")
    rng = np.random.default_rng(seed)
    if not 0 <= jitter <= 0.5:
        raise ValueError(f"jitter {jitter} must lie in [0, 0.5] (a fraction of the crop side)")
    if train_dir is None and catalog < 1:
        raise ValueError("nothing to train on: give training shards, catalog crops, or both")
    if catalog < 0:
        raise ValueError(f"catalog {catalog} must be >= 0")
    if windows and (catalog or train_dir is None):
        raise ValueError("object windows come from training shards (--data), not from the catalog")
    names = attributes = None
    if windows:
        train, names, attributes = object_windows(train_dir, cfg, progress=progress)
        held_out = object_windows(eval_dir, cfg, names, attributes, progress=progress)[0] if eval_dir else None
        model, rows = WindowClassifier(cfg, len(names), len(attributes)), ("pixel_values", "cells")
        unit = "windows"
    else:
        if catalog:  # toyworld's vocabularies, which the catalog draws from
            from data_gen.toyworld import COLORS, SHAPES, SIZES, TEXTURES
            names, attributes = sorted(SHAPES), sorted([*COLORS, *SIZES, *TEXTURES])
        parts = []
        if train_dir is not None:
            shard_crops, names, attributes = object_crops(train_dir, cfg, crop, rng, names, attributes, jitter)
            parts.append(shard_crops)
        if catalog:
            parts.append(catalog_crops(cfg, crop, catalog, seed, jitter, names, attributes, knobs))
        train = Crops(*(np.concatenate(arrays) for arrays in zip(*(vars(p).values() for p in parts))))
        held_out = object_crops(eval_dir, cfg, crop, rng, names, attributes, jitter)[0] if eval_dir else None
        model, rows = CropClassifier(cfg, len(names), len(attributes), crop), ("pixel_values",)
        unit = "crops"
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), *(getattr(train, r)[0] for r in rows))["params"])
    if init_tower is not None:
        params["vision"] = load_tower(init_tower, cfg)
    apply = jax.vmap(lambda p, *x: model.apply({"params": p}, *x), in_axes=(None,) + (0,) * len(rows))
    params, losses = fit_heads(params, apply, tuple(getattr(train, r) for r in rows), train.names, train.attributes,
                               steps=steps, batch=batch, lr=lr, rng=rng, desc="pretrain vision", progress=progress)
    predict = jax.jit(apply)

    def evaluate(p, data) -> dict[str, float]:
        return score_heads(predict, p, tuple(getattr(data, r) for r in rows), data.names, data.attributes)

    report = {"steps": steps, "batch": batch, "lr": lr, "init_tower": str(init_tower) if init_tower else None,
              "names": names, "attributes": attributes, "first_loss": losses[0], "final_loss": losses[-1]}
    if windows:
        report.update(windows=True)
    else:
        report.update(crop=crop, jitter=jitter, catalog_crops=catalog)
    report.update({f"train_{unit}": int(len(train.names)), "train": evaluate(params, train)})
    if held_out is not None:
        report.update({f"eval_{unit}": int(len(held_out.names)), "eval": evaluate(params, held_out)})

    vision = jax.device_get(params["vision"])
    if center:
        vision, report["centered"] = center_tower(cfg, vision, train_dir)
    full = dict(init_params(cfg, jax.random.key(seed)))
    full["vision"] = vision
    out_dir = Path(out_dir)
    save_checkpoint(out_dir, cfg, full)
    save_tower(out_dir / TOWER_NAME, vision, report)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traser_jax.pretrain_vision", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a preset name in configs/ or a YAML path")
    parser.add_argument("--data", default=None, help="training shard directory")
    parser.add_argument("--catalog", type=int, default=0,
                        help="crops of the toyworld object catalog to train on too (or alone, without --data)")
    parser.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE",
                        help="a toyworld knob for the catalog's frames (as data_gen.toyworld's), e.g. max_side=280")
    parser.add_argument("--eval-data", default=None, help="held-out shard directory to report on")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128, help="crops per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop", type=int, default=56, help="crop side in pixels of the resized frames")
    parser.add_argument("--jitter", type=float, default=0.25,
                        help="largest random shift of a crop off its object's centroid, as a fraction of the crop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--center", action="store_true",
                        help="center the tower's output tokens on the training videos (center_tower)")
    parser.add_argument("--from-tower", default=None, metavar="TOWER.npz",
                        help="train nothing: write the checkpoint with this saved tower (a run's tower.npz)")
    parser.add_argument("--init-tower", default=None, metavar="TOWER.npz", help="train from this saved tower")
    parser.add_argument("--windows", action="store_true",
                        help="train on each object's attention windows in the frames (--batch counts objects), "
                             "not on crops")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    from data_gen.toyworld import ToyworldConfig

    try:
        cfg = config_lib.load(args.config, args.overrides)
        if args.from_tower:
            report = checkpoint_from_tower(cfg, args.from_tower, args.out, seed=args.seed)
            print(json.dumps({k: report[k] for k in ("from_tower", "eval_crops", "eval_windows", "eval") if k in report}))
            return 0
        report = pretrain(cfg, args.data, args.out, eval_dir=args.eval_data, steps=args.steps, batch=args.batch,
                          lr=args.lr, crop=args.crop, jitter=args.jitter, seed=args.seed, catalog=args.catalog,
                          center=args.center, windows=args.windows, init_tower=args.init_tower,
                          knobs=ToyworldConfig.parse_knobs(args.knob))
    except (config_lib.ConfigError, ValueError, TypeError, RuntimeError, FileNotFoundError) as err:  # TypeError: an unknown knob
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("train_crops", "train_windows", "final_loss", "train", "eval_crops", "eval_windows",
                                      "eval") if k in report}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

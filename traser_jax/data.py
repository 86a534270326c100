"""The training input pipeline: grain over ArrayRecord shards -> packed, bucketed batches.

    ShardReader (random access) -> this host's slice -> shuffle, repeat
      -> Featurize (worker processes): decode frames, resize to the vision grid,
         patchify; token selection + trajectory arrangement; prompt + target tokens
      -> batch with `collate`: pad every video to the batch's shape bucket

A batch is a dict of numpy arrays leading with the batch axis. `grid_thw`,
`object_ids` and `window_object` stay on the host (they fix the static shapes the
step compiles for); `DEVICE_KEYS` go to the devices. With `data.cache_vision_tokens`
the frozen tower's output tokens (`video_tokens`) take the place of `pixel_values`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_gen.record import Record, to_traser_json
from data_gen.shards import Example, ShardReader
from traser_jax import tokens as tokens_lib
from traser_jax import config as config_lib
from traser_jax.config import Config
from traser_jax.tokenizer import PROMPTS, load_tokenizer, serialize_target, train_bpe
from traser_jax.video_input import normalize, patchify, resize_frames, resized_size

DEVICE_KEYS = ("pixel_values", "video_tokens", "sel_token", "otr_segment", "twr_segment", "input_ids",
               "latent_index", "positions", "attention_mask", "labels")


def video_features(record: Record, frames: np.ndarray, cfg: Config) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Sampled frames -> (pixel_values [patches, C*2*14*14], grid_thw) at the size token selection uses."""
    h, w = resized_size(record.video.height, record.video.width, cfg.vision, cfg.tokens)
    v = cfg.vision
    return patchify(normalize(resize_frames(np.asarray(frames), h, w)), v.patch_size, v.temporal_patch_size,
                    v.spatial_merge_size)


@dataclasses.dataclass
class Features:
    """One video, featurized and unpadded."""
    video_id: str
    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    inputs: tokens_lib.TraserInputs
    video_tokens: np.ndarray | None = None  # the frozen tower's output [merged tokens, D], when cached


def target_text(record: Record, task: str = "scene_graph") -> str:
    """The answer the model learns: the record's canonical TRASER JSON, reduced to what `task` asks
    for (objects, with attributes for scene_graph / attributes, relationships for scene_graph /
    relationships)."""
    payload = to_traser_json(record)
    objects = payload["objects"]
    if task not in ("scene_graph", "attributes"):
        objects = [{k: v for k, v in o.items() if k != "attributes"} for o in objects]
    answer = {"objects": objects}
    if task in ("scene_graph", "relationships"):
        answer["relationships"] = payload["relationships"]
    return serialize_target(answer)


def check_task_mix(task_mix: dict[str, float]) -> None:
    if not isinstance(task_mix, dict) or not task_mix:
        raise config_lib.ConfigError(f"data.task_mix {task_mix!r}: expected {{task: weight}}, tasks "
                                     f"{', '.join(PROMPTS)}")
    for task, weight in task_mix.items():
        if task not in PROMPTS:
            raise config_lib.ConfigError(f"data.task_mix: unknown task {task!r}; tasks: {', '.join(PROMPTS)}")
        if not isinstance(weight, (int, float)) or weight < 0:
            raise config_lib.ConfigError(f"data.task_mix: weight of {task!r} must be a number >= 0, got {weight!r}")
    if sum(task_mix.values()) <= 0:
        raise config_lib.ConfigError(f"data.task_mix {task_mix}: the weights sum to 0")


def task_of(video_id: str, task_mix: dict[str, float]) -> str:
    """The training task of a video: a fixed draw from task_mix by a hash of its id (the same in every
    worker, epoch and restart)."""
    u = int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:8], "big") / 2 ** 64 * sum(task_mix.values())
    for task, weight in task_mix.items():
        u -= weight
        if u < 0:
            return task
    return next(t for t, w in reversed(task_mix.items()) if w > 0)


def featurize(example: Example, cfg: Config, token_fn, with_target: bool = True) -> Features:
    """With a target, the prompt and answer of the video's task (`task_of`); without, the scene-graph
    prompt `data.prompt`."""
    record = example.record
    pixel_values, grid = video_features(record, example.frames, cfg)
    if with_target:
        task = task_of(record.video.id, cfg.data.task_mix)
        prompt = cfg.data.prompt if task == "scene_graph" else PROMPTS[task]
        inputs = tokens_lib.prepare(record, token_fn, cfg, prompt, target_text=functools.partial(target_text,
                                                                                              task=task))
    else:
        inputs = tokens_lib.prepare(record, token_fn, cfg, cfg.data.prompt)
    return Features(record.video.id, pixel_values.astype(np.float32), grid, inputs)


def collate(videos: Sequence[Features], cfg: Config) -> dict[str, np.ndarray]:
    """Pad a list of videos to one shape bucket and stack them (no offsets: the step vmaps per video)."""
    grids = {(g[1], g[2]) for g in (v.grid_thw for v in videos)}
    if len(grids) != 1:
        raise ValueError(f"videos of one batch need one frame size, got patch grids {sorted(grids)}; "
                         f"set tokens.frame_size to train on videos of different sizes")
    gh, gw = grids.pop()
    gt = tokens_lib.bucket_size(max(v.grid_thw[0] for v in videos), cfg.tokens.bucket_grid_t)
    cached = videos[0].video_tokens is not None
    key, rows = ("video_tokens", gt * gh * gw // cfg.vision.spatial_merge_size ** 2) if cached else \
        ("pixel_values", gt * gh * gw)
    arrays = [v.video_tokens if cached else v.pixel_values for v in videos]
    padded_video = np.zeros((len(videos), rows, arrays[0].shape[-1]), np.float32)
    for i, a in enumerate(arrays):
        padded_video[i, :len(a)] = a  # extra temporal grids: never selected
    shape = np.max([tokens_lib.bucket_shape(v.inputs, cfg.tokens) for v in videos], axis=0)
    padded = [tokens_lib.pad_to(v.inputs, *(int(s) for s in shape)).arrays() for v in videos]
    batch = {k: np.stack([p[k] for p in padded]) for k in padded[0]}
    batch.update({key: padded_video, "grid_thw": np.tile(np.array([gt, gh, gw], np.int32), (len(videos), 1))})
    return batch


def device_keys(batch: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The DEVICE_KEYS a batch carries (pixel_values or video_tokens)."""
    return tuple(k for k in DEVICE_KEYS if k in batch)


class Featurize:
    """grain map: Example -> Features (picklable: the tokenizer is rebuilt in each worker)."""

    def __init__(self, cfg: Config, tokenizer_path: str, with_target: bool = True):
        self.cfg, self.tokenizer_path, self.with_target = cfg, tokenizer_path, with_target
        self._token_fn = None

    def __call__(self, example: Example) -> Features:
        if self._token_fn is None:
            self._token_fn = tokens_lib.as_token_fn(load_tokenizer(self.tokenizer_path))
        return featurize(example, self.cfg, self._token_fn, self.with_target)

    def __getstate__(self):
        return {**self.__dict__, "_token_fn": None}


def run_tokenizer(cfg: Config) -> str:
    """The run's tokenizer.json: cfg.data.tokenizer, or a small BPE trained on the training
    targets and prompt texts, saved in the run directory. Writes its special-token ids
    into cfg.tokens."""
    check_task_mix(cfg.data.task_mix)  # the BPE learns the mix's prompts
    path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.train.run_dir) / "tokenizer.json"
    if not path.exists():
        if cfg.data.tokenizer:
            raise FileNotFoundError(f"data.tokenizer: no file {path}")
        reader = ShardReader(cfg.data.train_dir)
        texts = [target_text(reader[i].record) for i in range(len(reader))]
        prompts = [cfg.data.prompt, *(PROMPTS[t] for t, w in cfg.data.task_mix.items() if w and t != "scene_graph")]
        texts += [text for p in prompts for text in tokens_lib.chat_texts(p)]
        texts += [*(f"Object {k}: " for k in range(1, 41)),
                  *(tokens_lib.window_label(w, cfg.tokens.window_seconds) for w in range(64))]
        train_bpe(texts, cfg.data.tokenizer_vocab_size, path)
    apply_special_ids(cfg, load_tokenizer(path))
    return str(path)


def apply_special_ids(cfg: Config, tokenizer) -> None:
    """Point cfg.tokens at the tokenizer's special tokens; the model's vocab must cover it."""
    config_lib.apply_overrides(cfg, tokenizer.token_config_overrides())
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than text.vocab_size "
                         f"{cfg.text.vocab_size}")


def check_vision_cache(cfg: Config) -> None:
    """data.cache_vision_tokens needs what makes the cached tokens exact: every video featurized once in
    memory and the tower and merger frozen."""
    if cfg.data.cache_vision_tokens and not (cfg.data.cache_in_memory and cfg.optim.lr_vision == 0
                                             and cfg.optim.lr_merger == 0):
        raise config_lib.ConfigError(
            f"data.cache_vision_tokens needs data.cache_in_memory=true, optim.lr_vision=0 and optim.lr_merger=0 "
            f"(got {cfg.data.cache_in_memory}, {cfg.optim.lr_vision}, {cfg.optim.lr_merger}): the tower's "
            f"tokens are computed once, so it must not train")


def train_dataset(cfg: Config, tokenizer_path: str, *, process_index: int | None = None,
                  process_count: int | None = None, encode_video=None):
    """The infinite (or num_epochs) iterator dataset of training batches for this host.

    encode_video: (pixel_values, grid_thw) -> the frozen tower's output tokens, with
    data.cache_vision_tokens (`check_vision_cache`): each video's are computed once, in this process."""
    import grain
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if cfg.data.global_batch_size % (process_count * cfg.data.grad_accum_steps):
        raise ValueError(f"data.global_batch_size {cfg.data.global_batch_size} must divide by processes x "
                         f"grad_accum_steps = {process_count} x {cfg.data.grad_accum_steps}")
    per_host = cfg.data.global_batch_size // process_count
    check_task_mix(cfg.data.task_mix)
    ds = grain.MapDataset.source(ShardReader(cfg.data.train_dir))
    ds = ds[process_index::process_count].map(Featurize(cfg, tokenizer_path))
    if cfg.data.cache_in_memory:  # featurize each video once (small datasets: the demo, sweeps)
        videos = list(in_workers(ds, cfg.data.worker_count))
        if cfg.data.cache_vision_tokens:  # train.run has checked the settings (check_vision_cache)
            if encode_video is None:
                raise ValueError("data.cache_vision_tokens: train_dataset needs encode_video")
            videos = [dataclasses.replace(v, video_tokens=np.asarray(encode_video(v.pixel_values, v.grid_thw),
                                                                     np.float32), pixel_values=None)
                      for v in videos]
        ds = grain.MapDataset.source(videos)
    ds = ds.shuffle(seed=cfg.data.shuffle_seed).repeat(cfg.data.num_epochs or None)
    ds = ds.batch(per_host, drop_remainder=True, batch_fn=functools.partial(collate, cfg=cfg))
    return in_workers(ds, 0 if cfg.data.cache_in_memory else cfg.data.worker_count)


def in_workers(ds, workers: int):
    """A MapDataset as an iterator dataset computed in `workers` processes (0: in this one). One thread,
    two elements ahead: grain's default (16 threads, 500 elements ahead) suits KiB-sized records, and
    our elements are MiB-sized batches that would take the host's memory and cores from the step."""
    import grain
    from absl import flags

    if workers > 0 and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; we parse our own argv
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)) if workers > 0 else ds

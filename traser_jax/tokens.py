"""TRASER token selection and trajectory arrangement, on the host, in numpy.

Selection (REFERENCE.md "TRASER"): the vision tower's merged tokens are 28x28 px
cells of the resized frame, one set per temporal grid of 2 frames. An object's
coverage of a cell is the mean of its mask over the cell, the max over the two
frames of the grid. It keeps the cells with coverage >= 0.5; if none, the
threshold drops by 0.2 up to twice; if still none, its single best cell. Objects
empty on every sampled frame are dropped, then the first `max_objects` (40) are
kept, in record order. Cells of no object never reach the model.

Arrangement, one block per kept object, renumbered 1..K:
    <obj_traj_start> "Object k: " <|vision_start|> [OTR: n latents]
    "<0 - 4 sec>" [TWR: n latents] "<4 - 8 sec>" [TWR: n latents] ...
    <|vision_end|> <obj_traj_end>
A token's window is its index in the video's merged-token stream divided by
(merged tokens per temporal grid x grids per window), i.e. its temporal grid //
grids per window; windows where the object has no token are skipped.

Choices made here (the released code is not at hand; each is documented where it is made):
- Coverage is an exact area average of the mask at whatever resolution it comes
  (the video's or the resized frame's): area resampling composes, so this equals
  area-resizing the mask to the resized frame and averaging each 28x28 cell.
  Coverage is rounded to 9 decimals so the rule gives the same tokens in any
  float implementation (tests compare with an independent torch version).
- Grids per window = round(window_seconds / seconds per temporal grid), at least
  1; seconds per temporal grid = temporal_patch_size x the sampling period
  (duration / sampled frames: 1 s at TRASER's ~1 fps). A window's text label
  gives its span in those seconds, rounded half up: "<0 - 4 sec>" at 1 fps.
- The cap `max_tokens` (20000) bounds the arranged object blocks (the LLM
  tokens they take, latents included); trailing objects are dropped whole, so
  every kept object keeps its whole block and the numbering 1..K stays the
  record order, as with the 40-object cap.

Packing: every selected token carries its object slot (`otr_segment`) and its
(object, window) slot (`twr_segment`), so each resampler is one segment-masked
attention over all selected tokens; `latent_index` says which resampler output
row fills each latent slot of the LLM sequence. `pad_to_buckets` pads to a few
shapes; `stack` batches videos.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from data_gen import rle as rle_lib
from data_gen.record import CAMERA_ID, Record, Video
from traser_jax.config import Config, TokenConfig, VisionConfig
from traser_jax.video_input import resized_size

COVERAGE_DECIMALS = 9
IGNORE_INDEX = -100  # labels of tokens without loss
SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_PROMPT = "Output the Video Scene Graph from the video and object trajectories:"

TokenFn = Callable[[str], Sequence[int]]


def as_token_fn(tokenizer) -> TokenFn:
    """A str -> ids callable from a `tokenizers.Tokenizer`, a transformers tokenizer or a callable."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    if hasattr(tokenizer, "encode"):  # transformers tokenizer
        return lambda text: tokenizer.encode(text, add_special_tokens=False)
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must be callable or have .encode, got {type(tokenizer).__name__}")


def chat_texts(prompt: str = DEFAULT_PROMPT, system: str = SYSTEM_PROMPT) -> tuple[str, str]:
    """Qwen chat template around the object blocks: (text before them, text after them).

    The user turn holds the prompt text, then the blocks on their own lines."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}\n",
            "\n<|im_end|>\n<|im_start|>assistant\n")


# -- geometry and timing ------------------------------------------------------------

@dataclass(frozen=True)
class TokenGrid:
    """The merged-token grid of one video: grid_t temporal grids of merged_h x merged_w cells."""
    num_frames: int  # sampled frames, before temporal padding
    grid_t: int
    merged_h: int
    merged_w: int
    temporal_patch_size: int

    @property
    def cells_per_grid(self) -> int:
        return self.merged_h * self.merged_w

    @property
    def num_tokens(self) -> int:
        return self.grid_t * self.cells_per_grid


def token_grid(num_frames: int, height: int, width: int, vision: VisionConfig, tokens: TokenConfig) -> TokenGrid:
    """The grid for `num_frames` sampled frames of `height` x `width` (the video's size, before resizing)."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    rh, rw = resized_size(height, width, vision, tokens)
    cell = vision.patch_size * vision.spatial_merge_size
    tps = vision.temporal_patch_size
    return TokenGrid(num_frames, -(-num_frames // tps), rh // cell, rw // cell, tps)


def sampling_period(video: Video) -> float:
    """Seconds between sampled frames: duration / sampled frames (TRASER samples ~1 fps)."""
    return video.duration / max(len(video.frame_indices), 1)


def window_layout(seconds_per_frame: float, temporal_patch_size: int, window_seconds: float) -> tuple[int, float]:
    """(temporal grids per window, the window's span in seconds) for the labels."""
    if not (seconds_per_frame > 0 and math.isfinite(seconds_per_frame)):
        raise ValueError(f"seconds_per_frame must be positive, got {seconds_per_frame!r}")
    if not window_seconds > 0:
        raise ValueError(f"tokens.window_seconds must be positive, got {window_seconds!r}")
    seconds_per_grid = temporal_patch_size * seconds_per_frame
    grids = max(1, int(math.floor(window_seconds / seconds_per_grid + 0.5)))
    return grids, grids * seconds_per_grid


def window_label(window: int, span_seconds: float) -> str:
    start, end = (int(math.floor(v * span_seconds + 0.5)) for v in (window, window + 1))
    return f"<{start} - {end} sec>"


# -- selection ----------------------------------------------------------------------

def area_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in]: share of output cell i that source pixel p covers (rows sum to 1)."""
    edges = np.arange(out_size + 1, dtype=np.float64) * in_size / out_size
    p = np.arange(in_size, dtype=np.float64)
    overlap = np.minimum(p[None, :] + 1, edges[1:, None]) - np.maximum(p[None, :], edges[:-1, None])
    return np.clip(overlap, 0.0, None) / (in_size / out_size)


def object_coverage(masks: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """One object's masks [T, H, W] (any resolution) -> coverage [grid_t, merged_h, merged_w]."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != grid.num_frames:
        raise ValueError(f"masks must be [num_frames={grid.num_frames}, H, W], got shape {masks.shape}")
    t, h, w = masks.shape
    a_h, a_w = area_weights(h, grid.merged_h), area_weights(w, grid.merged_w)
    cov = np.zeros((grid.grid_t * grid.temporal_patch_size, grid.merged_h, grid.merged_w))
    for i, m in enumerate(masks):  # frame by frame: a float copy of all frames can be GBs
        if m.any():
            cov[i] = a_h @ (m != 0).astype(np.float64) @ a_w.T
    cov[t:] = cov[t - 1]  # temporal padding repeats the last frame, as the processor does
    cov = cov.reshape(grid.grid_t, grid.temporal_patch_size, grid.merged_h, grid.merged_w).max(axis=1)
    return np.round(cov, COVERAGE_DECIMALS)


def select_tokens(coverage: np.ndarray, tokens: TokenConfig) -> np.ndarray:
    """Coverage [grid_t, Hm, Wm] of a non-empty object -> its merged-token indices, ascending."""
    flat = np.asarray(coverage).reshape(-1)
    for attempt in range(tokens.fallback_tries + 1):
        threshold = round(tokens.coverage_threshold - attempt * tokens.fallback_step, COVERAGE_DECIMALS)
        keep = np.flatnonzero((flat >= threshold) & (flat > 0))
        if keep.size:
            return keep
    return np.array([int(np.argmax(flat))])  # the single best token (first one on ties)


@dataclass
class Selection:
    """Selected merged tokens per kept object, before arrangement."""
    grid: TokenGrid
    seconds_per_frame: float
    object_ids: list[int]  # kept objects, in record order
    object_tokens: list[np.ndarray]  # per kept object: merged-token indices, ascending


def select(masks_by_object: Iterable[tuple[int, np.ndarray]], grid: TokenGrid, tokens: TokenConfig,
           seconds_per_frame: float) -> Selection:
    """(object id, masks [T, H, W]) in record order -> Selection (empty objects dropped, first max_objects kept)."""
    ids, chosen = [], []
    for oid, masks in masks_by_object:
        if len(ids) == tokens.max_objects:
            break
        masks = np.asarray(masks)
        if not masks.any():
            continue
        ids.append(int(oid))
        chosen.append(select_tokens(object_coverage(masks, grid), tokens))
    return Selection(grid, float(seconds_per_frame), ids, chosen)


def select_from_masks(masks: np.ndarray, grid: TokenGrid, tokens: TokenConfig, seconds_per_frame: float,
                      object_ids: Sequence[int] | None = None) -> Selection:
    """masks uint8 [K, T, H, W] -> Selection; object ids default to 0..K-1."""
    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise ValueError(f"masks must be [K, T, H, W], got shape {masks.shape}")
    ids = range(masks.shape[0]) if object_ids is None else list(object_ids)
    if len(ids) != masks.shape[0]:
        raise ValueError(f"object_ids has {len(ids)} entries, masks has {masks.shape[0]} objects")
    return select(zip(ids, masks), grid, tokens, seconds_per_frame)


def select_from_record(record: Record, vision: VisionConfig, tokens: TokenConfig) -> Selection:
    """Selection from a record's RLE masks, decoding one object at a time."""
    v = record.video
    grid = token_grid(len(v.frame_indices), v.height, v.width, vision, tokens)

    def decoded() -> Iterator[tuple[int, np.ndarray]]:
        for o in record.objects:
            if any(rle_lib.area(m) for m in o.masks):
                yield o.id, np.stack([rle_lib.decode(m) for m in o.masks])

    return select(decoded(), grid, tokens, sampling_period(v))


# -- arrangement and packing --------------------------------------------------------

@dataclass
class TraserInputs:
    """Packed model inputs of one video (or, after `stack`, a batch: a leading axis B on every array).

    Latent slots of the LLM sequence hold `video_token_id` in `input_ids`; their
    embeddings are rows of concat(OTR outputs [K * n, D], TWR outputs [W * n, D])
    named by `latent_index`, where K and W are the (padded) lengths of
    `object_ids` and `window_object` and n = `num_latents`. Padding: -1 in the
    segment, index and id arrays; 0 in `input_ids`, `positions`, `sel_token`,
    `attention_mask`; IGNORE_INDEX in `labels`.
    """
    sel_token: np.ndarray  # [N] merged-token index in the video's vision-tower output (offset per video in a batch)
    otr_segment: np.ndarray  # [N] object slot 0..K-1
    twr_segment: np.ndarray  # [N] window slot 0..W-1, over all objects
    input_ids: np.ndarray  # [L]
    latent_index: np.ndarray  # [L] row into concat(OTR, TWR) outputs; -1 for text
    positions: np.ndarray  # [L] plain 1-D positions (the same on the three M-RoPE axes)
    attention_mask: np.ndarray  # [L] 1 for real tokens
    labels: np.ndarray  # [L] target ids where the loss applies, IGNORE_INDEX elsewhere
    object_ids: np.ndarray  # [K] record ids of the objects, block order
    window_object: np.ndarray  # [W] object slot of each window slot
    window_number: np.ndarray  # [W] the window's index on the video's timeline
    num_objects: np.ndarray  # [] int32
    num_windows: np.ndarray  # []
    num_selected: np.ndarray  # [] real entries of sel_token
    length: np.ndarray  # [] real entries of input_ids
    num_vision_tokens: np.ndarray  # [] merged tokens the vision tower gives for this video
    num_latents: int  # n latents per resampler output (static)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "num_latents"}


def arrange(selection: Selection, token_fn: TokenFn, tokens: TokenConfig, num_latents: int,
            prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = (),
            target_ids: Sequence[int] = ()) -> TraserInputs:
    """The LLM sequence prefix + object blocks + suffix + target, packed, unpadded.

    `labels` are `target_ids` on the target positions (the trainer shifts them)."""
    grid = selection.grid
    grids_per_window, span = window_layout(selection.seconds_per_frame, grid.temporal_patch_size,
                                           tokens.window_seconds)
    tokens_per_window = grid.cells_per_grid * grids_per_window

    # Pass 1: each object's block as pieces (token ids, or a latent run) and the cap.
    blocks = []  # per kept object: (pieces, windows)
    used = 0
    for slot, toks in enumerate(selection.object_tokens):
        windows = np.unique(toks // tokens_per_window)
        pieces: list = [[tokens.obj_traj_start_id, *token_fn(f"Object {slot + 1}: "), tokens.vision_start_id],
                        ("otr", slot)]
        for i, w in enumerate(windows):
            pieces += [list(token_fn(window_label(int(w), span))), ("twr", i)]
        pieces.append([tokens.vision_end_id, tokens.obj_traj_end_id])
        size = sum(num_latents if isinstance(p, tuple) else len(p) for p in pieces)
        if used + size > tokens.max_tokens:
            if not blocks:
                raise ValueError(f"tokens.max_tokens={tokens.max_tokens} is smaller than the first object's block "
                                 f"({size} tokens)")
            break  # drop this object and all after it, whole
        used += size
        blocks.append((pieces, windows))
    k = len(blocks)

    # Pass 2: the sequence; latent rows are OTR k -> k*n.., TWR slot s -> (K + s)*n..
    sel_token, otr_seg, twr_seg, window_object, window_number = [], [], [], [], []
    seq, lat = list(prefix_ids), [-1] * len(prefix_ids)
    for slot, (pieces, windows) in enumerate(blocks):
        toks = selection.object_tokens[slot]
        first_window_slot = len(window_object)
        sel_token.append(toks)
        otr_seg.append(np.full(toks.size, slot))
        twr_seg.append(first_window_slot + np.searchsorted(windows, toks // tokens_per_window))
        window_object += [slot] * len(windows)
        window_number += windows.tolist()
        for piece in pieces:
            if isinstance(piece, tuple):
                row = slot if piece[0] == "otr" else k + first_window_slot + piece[1]
                seq += [tokens.video_token_id] * num_latents
                lat += range(row * num_latents, (row + 1) * num_latents)
            else:
                seq += piece
                lat += [-1] * len(piece)
    seq += [*suffix_ids, *target_ids]
    lat += [-1] * (len(suffix_ids) + len(target_ids))
    labels = [IGNORE_INDEX] * (len(seq) - len(target_ids)) + list(target_ids)

    def cat(parts):
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    n_len = len(seq)
    return TraserInputs(
        sel_token=cat(sel_token), otr_segment=cat(otr_seg), twr_segment=cat(twr_seg),
        input_ids=np.asarray(seq, np.int32), latent_index=np.asarray(lat, np.int32),
        positions=np.arange(n_len, dtype=np.int32), attention_mask=np.ones(n_len, np.int32),
        labels=np.asarray(labels, np.int32),
        object_ids=np.asarray(selection.object_ids[:k], np.int32),
        window_object=np.asarray(window_object, np.int32), window_number=np.asarray(window_number, np.int32),
        num_objects=np.int32(k), num_windows=np.int32(len(window_object)),
        num_selected=np.int32(sum(t.size for t in sel_token)), length=np.int32(n_len),
        num_vision_tokens=np.int32(grid.num_tokens), num_latents=num_latents)


def kept_record(record: Record, object_ids: Sequence[int]) -> Record:
    """The record reduced to the objects that got a block (and the relations among them and the
    camera): its TRASER JSON numbers objects 1..K exactly as the blocks do."""
    keep = {int(i) for i in object_ids}
    objects = [o for o in record.objects if o.id in keep]
    relations = [r for r in record.relations if r.subject in keep and (r.object in keep or r.object == CAMERA_ID)]
    return dataclasses.replace(record, objects=objects, relations=relations)


def prepare(record: Record, token_fn: TokenFn, cfg: Config, prompt: str = DEFAULT_PROMPT,
            target_text: str | Callable[[Record], str] | None = None) -> TraserInputs:
    """One record -> packed (unpadded) inputs in the Qwen chat template.

    `target_text` (the answer JSON) becomes the labelled assistant turn, closed by
    <|im_end|>. Pass a function of a record (e.g. one calling `to_traser_json`) to
    have it built from `kept_record(record, kept ids)`: with more than max_objects
    objects, or past max_tokens, the answer then names only the objects the model sees."""
    prefix, suffix = (token_fn(t) for t in chat_texts(prompt))
    selection = select_from_record(record, cfg.vision, cfg.tokens)
    n = cfg.resampler.num_latents
    if callable(target_text):
        kept = arrange(selection, token_fn, cfg.tokens, n).object_ids
        target_text = target_text(kept_record(record, kept.tolist()))
    target = token_fn(target_text + "<|im_end|>") if target_text is not None else ()
    return arrange(selection, token_fn, cfg.tokens, n, prefix, suffix, target)


# -- shape buckets and batching -----------------------------------------------------

def bucket_size(n: int, buckets: Sequence[int]) -> int:
    """The first bucket >= n; past the last, the next multiple of the last."""
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(buckets):
        raise ValueError(f"buckets must be positive and ascending, got {list(buckets)}")
    for b in buckets:
        if n <= b:
            return int(b)
    return int(-(-n // buckets[-1]) * buckets[-1])


def bucket_shape(x: TraserInputs, tokens: TokenConfig) -> tuple[int, int, int, int]:
    """(N, L, K, W) buckets for one video's unpadded inputs."""
    return (bucket_size(int(x.num_selected), tokens.bucket_selected),
            bucket_size(int(x.length), tokens.bucket_length),
            bucket_size(int(x.num_objects), tokens.bucket_objects),
            bucket_size(int(x.num_windows), tokens.bucket_windows))


def _pad(a: np.ndarray, size: int, value: int) -> np.ndarray:
    if a.shape[-1] > size:
        raise ValueError(f"cannot pad an array of length {a.shape[-1]} down to {size}")
    return np.concatenate([a, np.full(size - a.shape[-1], value, a.dtype)])


def pad_to(x: TraserInputs, n: int, length: int, k: int, w: int) -> TraserInputs:
    """Pad one video's unpadded inputs to N=n, L=length, K=k, W=w."""
    k_old = x.object_ids.shape[-1]
    # TWR rows sit after the K * n OTR rows: move them when K grows
    lat = np.where(x.latent_index >= k_old * x.num_latents, x.latent_index + (k - k_old) * x.num_latents,
                   x.latent_index).astype(np.int32)
    return dataclasses.replace(
        x, sel_token=_pad(x.sel_token, n, 0), otr_segment=_pad(x.otr_segment, n, -1),
        twr_segment=_pad(x.twr_segment, n, -1), input_ids=_pad(x.input_ids, length, 0),
        latent_index=_pad(lat, length, -1), positions=_pad(x.positions, length, 0),
        attention_mask=_pad(x.attention_mask, length, 0), labels=_pad(x.labels, length, IGNORE_INDEX),
        object_ids=_pad(x.object_ids, k, -1), window_object=_pad(x.window_object, w, -1),
        window_number=_pad(x.window_number, w, -1))


def pad_to_buckets(x: TraserInputs, tokens: TokenConfig) -> TraserInputs:
    return pad_to(x, *bucket_shape(x, tokens))


def stack(videos: Sequence[TraserInputs], tokens: TokenConfig) -> TraserInputs:
    """Batch unpadded videos: pad all to the largest bucket of each size, stack on a new axis 0.

    `sel_token` is offset so it indexes the concatenation of the videos' vision-tower
    outputs, in this order (the tower runs on their pixel_values concatenated)."""
    if not videos:
        raise ValueError("stack needs at least one video")
    if len({v.num_latents for v in videos}) != 1:
        raise ValueError(f"videos have different num_latents: {sorted({v.num_latents for v in videos})}")
    shape = np.max([bucket_shape(v, tokens) for v in videos], axis=0)
    offset, padded = 0, []
    for v in videos:
        p = pad_to(v, *(int(s) for s in shape))
        real = np.arange(p.sel_token.shape[-1]) < int(v.num_selected)
        padded.append(dataclasses.replace(p, sel_token=np.where(real, p.sel_token + offset, 0).astype(np.int32)))
        offset += int(v.num_vision_tokens)
    fields = padded[0].arrays()
    return TraserInputs(**{name: np.stack([getattr(p, name) for p in padded]) for name in fields},
                        num_latents=videos[0].num_latents)

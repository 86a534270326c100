"""Pictures of a video scene graph: sampled frames with mask overlays, objects, and a relation timeline.

    render_scene_graph(record, frames, "graph.png")
    render_comparison(ground_truth, prediction, frames, "compare.png")

matplotlib's Agg canvas (no display, no pyplot state); numpy only otherwise.
"""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from data_gen.record import CAMERA_ID, CATEGORIES, Record, Relation

MAX_TILES = 8  # sampled frames drawn (evenly spread over the video)
TILE_COLUMNS = 4
MAX_ROWS = 120  # timeline rows at most; beyond, categories share the rows round-robin
OBJECT_PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                  "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
                  "#808000", "#ffd8b1", "#000075", "#808080"]
CATEGORY_COLORS = {"spatial": "#4363d8", "functional": "#9a6324", "stateful": "#911eb4", "motion": "#3cb44b",
                   "social": "#f58231", "attentional": "#f032e6", "event_level": "#e6194b", None: "#808080"}


def render_scene_graph(record: Record, frames: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Draw `record` over its sampled `frames` (uint8 [T, H, W, 3]) into the PNG `path`."""
    frames = _check_frames(record, frames)
    rows = [(_triplet(record, r), r) for r in _ordered(_fair_subset(record.relations, MAX_ROWS))]
    fig, axes_frames, ax_objects, ax_time = _figure(
        record, frames, n_rows=len(rows), object_rows=-(-len(record.objects) // 2),
        title=title or f"{record.video.id}: {len(record.objects)} objects, {len(record.relations)} relations")
    _draw_tiles(axes_frames, record, frames)
    _draw_objects(ax_objects, record)
    labels = []
    for y, (label, rel) in enumerate(rows):
        _bars(ax_time, y, rel.spans, CATEGORY_COLORS.get(rel.category, "#808080"), 0.7, record.video.duration)
        labels.append(label)
    _finish_timeline(ax_time, record, labels, extra=len(record.relations) - len(rows))
    present = [c for c in CATEGORIES if any(r.category == c for r in record.relations)]
    ax_time.legend(handles=[Patch(color=CATEGORY_COLORS[c], label=c) for c in present], loc="upper left",
                   bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def render_comparison(gt_record: Record, pred_record: Record, frames: np.ndarray, path: str | Path,
                      title: str | None = None) -> Path:
    """Prediction next to ground truth: frames with the ground-truth masks, object names side by side
    (mismatches in red), and one timeline row per triplet with the ground-truth spans (upper bar) and
    the predicted ones (lower bar). Objects are aligned by id, as in TRASER's evaluation."""
    frames = _check_frames(gt_record, frames)
    gt = {_key(r): r for r in gt_record.relations}
    pred = {}  # a triplet predicted more than once (a looping model) is one row with all its spans
    for r in pred_record.relations:
        first = pred.setdefault(_key(r), dataclasses.replace(r, spans=[]))
        first.spans.extend(r.spans)
    keys = [k for k in (_key(r) for r in _ordered(gt_record.relations))]
    keys += [k for k in dict.fromkeys(_key(r) for r in _ordered(pred_record.relations)) if k not in gt]
    hits = sum(1 for k in gt if k in pred)
    fig, axes_frames, ax_objects, ax_time = _figure(
        gt_record, frames, n_rows=min(len(keys), MAX_ROWS), object_rows=len(gt_record.objects) + 1,
        title=title or (f"{gt_record.video.id}: ground truth vs prediction: {hits}/{len(gt)} ground-truth "
                        f"triplets predicted, {len(pred) - hits} extra"))
    _draw_tiles(axes_frames, gt_record, frames)
    _draw_object_comparison(ax_objects, gt_record, pred_record)
    labels = []
    duration = gt_record.video.duration
    for y, key in enumerate(keys[:MAX_ROWS]):
        if key in gt:
            _bars(ax_time, y - 0.18, gt[key].spans, "#2b7bba", 0.34, duration)
        if key in pred:
            _bars(ax_time, y + 0.18, pred[key].spans, "#f08a24", 0.34, duration)
        labels.append(_triplet(gt_record, gt.get(key) or pred[key], names_from=pred_record if key not in gt else None))
    _finish_timeline(ax_time, gt_record, labels, extra=len(keys) - MAX_ROWS)
    ax_time.legend(handles=[Patch(color="#2b7bba", label="ground truth"), Patch(color="#f08a24", label="prediction")],
                   loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


# -- layout ----------------------------------------------------------------------

def _figure(record: Record, frames: np.ndarray, n_rows: int, object_rows: int, title: str):
    """A figure laid out in inches, top to bottom: title, frame tiles, object list, relation timeline.

    Returns (figure, [(tile axes, sampled frame index)], object-list axes, timeline axes)."""
    tiles = _tile_indices(len(frames))
    columns = min(TILE_COLUMNS, len(tiles))
    tile_rows = -(-len(tiles) // columns)
    h, w = frames.shape[1:3]
    width_in, margin, gap, tile_title = 16.0, 0.25, 0.12, 0.28
    tile_w = (width_in - 2 * margin - (columns - 1) * gap) / columns
    tile_h = tile_w * h / w
    title_h, objects_h = 0.5, 0.24 * max(object_rows, 1) + 0.45
    time_h, time_bottom = 0.2 * max(n_rows, 1) + 0.3, 0.6
    height_in = title_h + tile_rows * (tile_h + tile_title) + objects_h + time_h + time_bottom
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)

    def axes(left: float, top: float, width: float, height: float):  # inches from the top-left corner
        return fig.add_axes((left / width_in, 1 - (top + height) / height_in, width / width_in, height / height_in))

    fig.text(0.5, 1 - 0.25 / height_in, title, fontsize=13, ha="center", va="center")
    axes_frames = []
    for k, j in enumerate(tiles):
        row, col = divmod(k, columns)
        top = title_h + row * (tile_h + tile_title) + tile_title
        axes_frames.append((axes(margin + col * (tile_w + gap), top, tile_w, tile_h), j))
    top = title_h + tile_rows * (tile_h + tile_title)
    ax_objects = axes(margin, top + 0.15, width_in - 2 * margin, objects_h - 0.2)
    label_w, legend_w = 3.6, 1.5
    ax_time = axes(label_w, top + objects_h + 0.1, width_in - label_w - legend_w, time_h - 0.1)
    return fig, axes_frames, ax_objects, ax_time


def _tile_indices(num_frames: int) -> list[int]:
    if num_frames <= MAX_TILES:
        return list(range(num_frames))
    return sorted(set(np.linspace(0, num_frames - 1, MAX_TILES).round().astype(int).tolist()))


def _draw_tiles(axes_tiles, record: Record, frames: np.ndarray) -> None:
    masks = record.masks_array()  # [K, T, H, W]
    colors = [np.array(to_rgb(_object_color(k))) for k in range(len(record.objects))]
    for ax, j in axes_tiles:
        image = frames[j].astype(np.float64) / 255.0
        for k, obj in enumerate(record.objects):
            m = masks[k, j].astype(bool)
            if not m.any():
                continue
            image[m] = 0.8 * image[m] + 0.2 * colors[k]
            image[_boundary(m)] = colors[k]
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        for k, obj in enumerate(record.objects):
            ys, xs = np.nonzero(masks[k, j])
            if xs.size:
                ax.text(xs.mean(), ys.mean(), str(obj.id), fontsize=8, ha="center", va="center", weight="bold",
                        color="black", bbox=dict(boxstyle="round,pad=0.15", fc=colors[k], ec="black", lw=0.5,
                                                 alpha=0.9))
        ax.set_title(f"frame {record.video.frame_indices[j]}  t={record.video.timestamps[j]:.1f}s", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])


def _boundary(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _object_color(k: int) -> str:
    return OBJECT_PALETTE[k % len(OBJECT_PALETTE)]


def _describe(obj) -> str:
    attrs = ", ".join(obj.attributes)
    return f"{obj.id}: {obj.name or '?'}" + (f" [{attrs}]" if attrs else "") + (" (uncertain)" if obj.uncertain else "")


def _draw_objects(ax, record: Record) -> None:
    ax.axis("off")
    per_column = -(-len(record.objects) // 2) or 1
    for k, obj in enumerate(record.objects):
        col, row = divmod(k, per_column)
        ax.text(0.0 + 0.5 * col, 1.0 - (row + 0.5) / per_column, _describe(obj), fontsize=9, va="center",
                transform=ax.transAxes, bbox=dict(boxstyle="square,pad=0.2", fc=_object_color(k), alpha=0.35, lw=0))


def _draw_object_comparison(ax, gt: Record, pred: Record) -> None:
    ax.axis("off")
    pred_by_id = pred.object_by_id()
    lines = len(gt.objects) + 1  # a header line, then one line per object
    ax.text(0.0, 1.0 - 0.5 / lines, "ground truth", fontsize=9, weight="bold", va="center", transform=ax.transAxes)
    ax.text(0.5, 1.0 - 0.5 / lines, "prediction", fontsize=9, weight="bold", va="center", transform=ax.transAxes)
    for k, obj in enumerate(gt.objects):
        y = 1.0 - (k + 1.5) / lines
        ax.text(0.0, y, _describe(obj), fontsize=9, va="center", transform=ax.transAxes,
                bbox=dict(boxstyle="square,pad=0.2", fc=_object_color(k), alpha=0.35, lw=0))
        p = pred_by_id.get(obj.id)
        same = p is not None and p.name == obj.name and list(p.attributes) == list(obj.attributes)
        ax.text(0.5, y, _describe(p) if p is not None else f"{obj.id}: (missing)", fontsize=9, va="center",
                transform=ax.transAxes, color="black" if same else "#c00000")


def _bars(ax, y: float, spans, color: str, height: float, duration: float) -> None:
    # A point event (start == end) still gets a visible sliver, ending at the video's end at the latest.
    sliver = max(duration / 150.0, 0.08)
    ax.broken_barh([(min(s, duration - sliver) if e - s < sliver else s, max(e - s, sliver)) for s, e in spans],
                   (y - height / 2, height), facecolors=color)


def _finish_timeline(ax, record: Record, labels: list[str], extra: int) -> None:
    duration = record.video.duration
    ax.set_xlim(0, duration)
    ax.set_ylim(len(labels) - 0.5 if labels else 0.5, -0.5)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    for t in record.video.timestamps:
        ax.axvline(t, color="#cccccc", lw=0.5, zorder=0)
    ax.set_xlabel("seconds (grey lines: sampled frames)", fontsize=9)
    ax.grid(False)
    if not labels:
        ax.text(0.5, 0.5, "no relations", ha="center", va="center", transform=ax.transAxes)
    if extra > 0:
        ax.set_title(f"{len(labels)} of {len(labels) + extra} relations drawn (categories share the rows)", fontsize=8,
                     loc="left")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# -- relation labels ---------------------------------------------------------------

def _key(r: Relation) -> tuple[int, str, int]:
    return r.subject, r.predicate, r.object


def _fair_subset(relations: list[Relation], limit: int) -> list[Relation]:
    """At most `limit` relations, taken round-robin over categories so that every category shows."""
    if len(relations) <= limit:
        return list(relations)
    by_category: dict = {}
    for r in _ordered(relations):
        by_category.setdefault(r.category, []).append(r)
    queues = list(by_category.values())
    picked: list[Relation] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked


def _ordered(relations: list[Relation]) -> list[Relation]:
    order = {c: k for k, c in enumerate(CATEGORIES)}
    return sorted(relations, key=lambda r: (order.get(r.category, len(order)), r.predicate, r.subject, r.object))


def _name(record: Record, object_id: int) -> str:
    if object_id == CAMERA_ID:
        return "camera"
    obj = record.object_by_id().get(object_id)
    return f"{obj.name or '?'} {object_id}" if obj is not None else f"? {object_id}"


def _triplet(record: Record, r: Relation, names_from: Record | None = None) -> str:
    source = names_from or record
    text = f"{_name(source, r.subject)} · {r.predicate} · {_name(source, r.object)}"
    return textwrap.shorten(text, width=60, placeholder="...")


def _check_frames(record: Record, frames: np.ndarray) -> np.ndarray:
    """Frames at the record's size: shards may store them smaller (same aspect), masks are at full size."""
    frames = np.asarray(frames)
    v = record.video
    if frames.ndim != 4 or frames.shape[0] != len(v.frame_indices) or frames.shape[-1] != 3:
        raise ValueError(f"frames have shape {frames.shape}, the record {v.id} needs "
                         f"[{len(v.frame_indices)}, H, W, 3] (one RGB image per sampled frame)")
    if frames.shape[1:3] == (v.height, v.width):
        return frames
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(f).resize((v.width, v.height), Image.Resampling.BILINEAR))
                     for f in frames.astype(np.uint8)])

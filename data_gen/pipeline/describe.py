"""Stage 4: a description of each object from the frames where it is most visible.

The describer is pluggable: `OpenAIDescriber` sends an OpenAI-compatible vision
endpoint, for each chosen frame, the full frame and a focal crop around the
object, both with the object's mask outlined; `DAMDescriber` runs DAM-3B-Video
(full + focal crop prompting) when the `dam` package is installed. The released
settings: the 40 largest objects, 8 frames each, temperature 0.2, top-p 0.5,
512 new tokens.
"""
from __future__ import annotations

import base64
import importlib.util
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from data_gen import rle as rle_lib
from data_gen.pipeline.config import DescribeConfig
from data_gen.pipeline.llm import LLMClient, MalformedReply
from data_gen.pipeline.tracking import Tracks

OUTLINE = (255, 32, 32)


class Describer(Protocol):
    concurrent: bool  # True when describe() may run from many threads at once (I/O-bound)

    def describe(self, frames: list[np.ndarray], masks: list[np.ndarray]) -> str:
        """A description of the object shown by `masks` (bool [H, W]) on `frames` (uint8 [H, W, 3])."""


def largest_objects(tracks: Tracks, limit: int) -> list[int]:
    """Ids of the `limit` objects with the largest mean visible area (ties: lower id first)."""
    mean_area = {i: float(np.mean([a for a in areas if a > 0] or [0])) for i, areas in tracks.areas().items()}
    ranked = sorted(tracks.ids, key=lambda i: (-mean_area[i], i))
    return sorted(ranked[:limit])


def most_visible(tracks: Tracks, obj_id: int, count: int) -> list[int]:
    """Indices (into tracks.positions) of the `count` frames where the object is largest, in time order."""
    areas = [rle_lib.area(m) for m in tracks.masks[obj_id]]
    ranked = sorted((j for j, a in enumerate(areas) if a > 0), key=lambda j: (-areas[j], j))
    return sorted(ranked[:count])


def outline(image: np.ndarray, mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The image with the mask's boundary drawn in OUTLINE."""
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    out = image.copy()
    out[edge] = OUTLINE
    return out


def focal_crop(image: np.ndarray, mask: np.ndarray, context: float = 0.5, min_side: int = 48) -> np.ndarray:
    """A square crop around the mask's box, enlarged by `context` of its side on each side."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    cy, cx = (ys[0] + ys[-1] + 1) / 2, (xs[0] + xs[-1] + 1) / 2
    side = max(ys[-1] + 1 - ys[0], xs[-1] + 1 - xs[0]) * (1 + 2 * context)
    side = int(min(max(side, min_side), max(h, w)))
    y0 = int(np.clip(round(cy - side / 2), 0, max(h - side, 0)))
    x0 = int(np.clip(round(cx - side / 2), 0, max(w - side, 0)))
    return image[y0:y0 + side, x0:x0 + side]


def data_url(image: np.ndarray, max_side: int) -> str:
    img = Image.fromarray(image)
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


DESCRIBE_SCHEMA = {
    "type": "object",
    "properties": {"description": {"type": "string"}},
    "required": ["description"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = ("You describe one object in a video for a dataset. Describe only what is visible of the "
                 "outlined object; never describe other objects or guess what is not shown.")


def _user_prompt(n: int) -> str:
    return (f"The same object is outlined in red on {n} frames of a video. For each frame you get the full frame, "
            "then a close-up crop around the object. Describe the outlined object in detail: what it is, its "
            "color, material, texture, pattern, shape, size relative to the scene, its parts and its state. "
            "Return JSON {\"description\": \"...\"}.")


class OpenAIDescriber:
    concurrent = True

    def __init__(self, llm: LLMClient, cfg: DescribeConfig):
        self.llm = llm
        self.cfg = cfg

    def describe(self, frames: list[np.ndarray], masks: list[np.ndarray]) -> str:
        content: list[dict] = [{"type": "text", "text": _user_prompt(len(frames))}]
        for k, (frame, mask) in enumerate(zip(frames, masks)):
            drawn = outline(frame, mask)
            content += [{"type": "text", "text": f"Frame {k + 1}, full frame:"},
                        {"type": "image_url", "image_url": {"url": data_url(drawn, self.cfg.image_max_side)}},
                        {"type": "text", "text": f"Frame {k + 1}, close-up:"},
                        {"type": "image_url", "image_url": {"url": data_url(focal_crop(drawn, mask),
                                                                            self.cfg.image_max_side)}}]
        reply = self.llm.complete_json(
            "describe", model=self.cfg.model, schema_name="object_description", schema=DESCRIBE_SCHEMA,
            messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_tokens,
            check=_check_description)
        return reply


def _check_description(parsed: dict) -> str:
    text = " ".join(parsed["description"].split())
    if not text:
        raise MalformedReply("the description is empty")
    return text


class DAMDescriber:
    """DAM-3B-Video (NVlabs describe-anything), prompted with full frames + focal crops."""
    concurrent = False

    def __init__(self, cfg: DescribeConfig, device: str = "cuda"):
        from dam import DescribeAnythingModel, disable_torch_init

        disable_torch_init()
        self.cfg = cfg
        self.model = DescribeAnythingModel(model_path=cfg.dam_model_path, conv_mode="v1",
                                           prompt_mode="full+focal_crop").to(device)

    def describe(self, frames: list[np.ndarray], masks: list[np.ndarray]) -> str:
        images = [Image.fromarray(f) for f in frames]
        mask_images = [Image.fromarray(m.astype(np.uint8) * 255) for m in masks]
        query = ("Video: " + "<image>" * len(images) + "\nGiven the video in the form of a sequence of frames "
                 "above, describe the object in the masked region in the video in detail.")
        text = self.model.get_description(images, mask_images, query, streaming=False,
                                          temperature=self.cfg.temperature, top_p=self.cfg.top_p, num_beams=1,
                                          max_new_tokens=self.cfg.max_tokens)
        return " ".join(str(text).split())


def dam_available() -> bool:
    return importlib.util.find_spec("dam") is not None


def make_describer(cfg: DescribeConfig, llm: LLMClient, device: str = "cuda") -> Describer:
    kind = cfg.describer
    if kind == "auto":
        kind = "dam" if dam_available() else "openai"
    if kind == "dam":
        if not dam_available():
            raise RuntimeError("describe.describer=dam but the `dam` package (NVlabs describe-anything) "
                               "is not installed")
        return DAMDescriber(cfg, device)
    return OpenAIDescriber(llm, cfg)


def describe_objects(frames: np.ndarray, tracks: Tracks, describer: Describer, cfg: DescribeConfig,
                     threads: int = 8) -> dict[int, str]:
    """Stage 4 on one video: {object id: description} for the largest objects.

    `frames` are the frames the tracks are given on (frames[j] for tracks.positions[j])."""
    chosen = largest_objects(tracks, cfg.max_objects)

    def one(obj_id: int) -> str:
        js = most_visible(tracks, obj_id, cfg.frames_per_object)
        return describer.describe([frames[j] for j in js], [tracks.mask(obj_id, j) for j in js])

    if describer.concurrent and len(chosen) > 1:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(chosen)))) as pool:
            texts = list(pool.map(one, chosen))
    else:
        texts = [one(i) for i in chosen]
    return dict(zip(chosen, texts))

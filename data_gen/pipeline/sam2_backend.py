"""SAM2 behind the pipeline's two interfaces: a segmenter (stage 1) and a propagator (stage 2).

Models are built from the configs shipped in the sam2 package; `checkpoint=None`
gives random weights (seeded, so every process builds the same model), which is
how tests and compute benchmarks run. One video-predictor instance serves both
stages: the image predictor only uses the base model's encoder and heads.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_gen.pipeline.config import ProposalConfig, Sam2Config
from data_gen.pipeline.proposals import remove_small_regions

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # SAM2's input normalization
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def has_cuda_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401
        return True
    except ImportError:
        return False


def build_model(cfg: Sam2Config, device: torch.device | None = None):
    """The SAM2 video predictor (a SAM2Base) from the package config, at cfg.image_size."""
    from sam2.build_sam import build_sam2_video_predictor

    device = device or resolve_device(cfg.device)
    import sam2.sam2_video_predictor as video_predictor_module

    # SAM2 opens a progress bar per propagation pass; the job's per-stage bars say enough
    video_predictor_module.tqdm = functools.partial(tqdm, disable=True)
    torch.manual_seed(cfg.seed)
    model = build_sam2_video_predictor(cfg.config, cfg.checkpoint, device=str(device),
                                       hydra_overrides_extra=[f"++model.image_size={cfg.image_size}"])
    if not has_cuda_extension():
        model.fill_hole_area = 0  # hole filling needs the CUDA extension (the builder sets 8 after our overrides)
    model.memory_attention.register_forward_pre_hook(_memory_in_query_dtype, with_kwargs=True)
    return model


def _memory_in_query_dtype(module, args, kwargs):
    # SAM2 stores memories in bfloat16. Without autocast (CPU), a frame whose memory holds
    # no float32 object pointer (the offline replay before the first conditioning frame)
    # would reach the float32 attention in bfloat16: cast it to the query's dtype.
    curr = kwargs.get("curr")
    if curr is not None:
        dtype = curr[0].dtype if isinstance(curr, (list, tuple)) else curr.dtype
        for name in ("memory", "memory_pos"):
            if kwargs.get(name) is not None and kwargs[name].dtype != dtype:
                kwargs[name] = kwargs[name].to(dtype)
    return args, kwargs


def autocast(model, enabled: bool = True):
    device = next(model.parameters()).device
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _amg_class():
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    class _AutomaticMaskGenerator(SAM2AutomaticMaskGenerator):
        # When no mask of a crop passes the thresholds, SAM2 leaves that crop's boxes
        # as a 1-D empty tensor and the cross-crop NMS then fails; give it shape [0, 4].
        def _process_crop(self, *args, **kwargs):
            data = super()._process_crop(*args, **kwargs)
            if len(data["rles"]) == 0:
                data["crop_boxes"] = torch.zeros((0, 4))
            return data

    return _AutomaticMaskGenerator


class Sam2MaskGenerator:
    """Stage 1 segmenter: SAM2 automatic masks with explicit multi-scale point grids."""

    def __init__(self, model, cfg: ProposalConfig, bfloat16: bool = True):
        from sam2.utils.amg import build_point_grid

        self.model = model
        self.cfg = cfg
        self.bfloat16 = bfloat16
        self.generator = _amg_class()(
            model, points_per_side=None, point_grids=[build_point_grid(n) for n in cfg.point_grids],
            points_per_batch=cfg.points_per_batch, pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
            crop_n_layers=cfg.crop_n_layers, crop_nms_thresh=cfg.crop_nms_thresh,
            crop_overlap_ratio=cfg.crop_overlap_ratio,
            # small regions are removed below on the full-resolution masks (SAM2's own removal
            # needs its CUDA extension; ours gives the same masks on every machine)
            min_mask_region_area=0, use_m2m=cfg.use_m2m, output_mode="binary_mask")
        s = model.image_size
        self.generator.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]

    def __call__(self, frame: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode(), autocast(self.model, self.bfloat16):
            anns = self.generator.generate(np.ascontiguousarray(frame))
        masks = [remove_small_regions(a["segmentation"], self.cfg.min_mask_region_area) for a in anns]
        return [m for m in masks if m.any()]


class Sam2Propagator:
    """Stage 2 propagator on SAM2's video predictor, fed frames from memory."""

    def __init__(self, predictor, bfloat16: bool = True):
        self.predictor = predictor
        self.bfloat16 = bfloat16
        self.state: dict | None = None

    @torch.inference_mode()
    def start(self, frames: np.ndarray) -> None:
        n, h, w = frames.shape[:3]
        s = self.predictor.image_size
        images = torch.empty((n, 3, s, s), dtype=torch.float32)
        for i in range(0, n, 16):  # resize in chunks: no full-video float copy at native size
            chunk = torch.from_numpy(np.ascontiguousarray(frames[i:i + 16])).permute(0, 3, 1, 2).float() / 255.0
            chunk = F.interpolate(chunk, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            images[i:i + 16] = (chunk - _MEAN) / _STD
        device = self.predictor.device
        # The frames stay in host memory (SAM2's offload_video_to_cpu): long videos fit on the GPU.
        self.state = {
            "images": images, "num_frames": n, "offload_video_to_cpu": True, "offload_state_to_cpu": False,
            "video_height": h, "video_width": w, "device": device, "storage_device": device,
            "point_inputs_per_obj": {}, "mask_inputs_per_obj": {}, "cached_features": {}, "constants": {},
            "obj_id_to_idx": {}, "obj_idx_to_id": {}, "obj_ids": [], "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
        }

    def _require_state(self) -> dict:
        if self.state is None:
            raise RuntimeError("Sam2Propagator.start(frames) must be called before tracking")
        return self.state

    def reset(self) -> None:
        self.predictor.reset_state(self._require_state())

    def add_mask(self, position: int, obj_id: int, mask: np.ndarray) -> None:
        with torch.inference_mode(), autocast(self.predictor, self.bfloat16):
            self.predictor.add_new_mask(self._require_state(), frame_idx=position, obj_id=obj_id,
                                        mask=torch.from_numpy(np.asarray(mask, bool)))

    def propagate(self, start: int, end: int) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        state = self._require_state()
        with torch.inference_mode(), autocast(self.predictor, self.bfloat16):
            for position, obj_ids, logits in self.predictor.propagate_in_video(
                    state, start_frame_idx=start, max_frame_num_to_track=end - start):
                masks = (logits[:, 0] > 0).cpu().numpy()
                yield position, {int(i): masks[k] for k, i in enumerate(obj_ids)}

    def close(self) -> None:
        self.state = None

"""Flax Linen modules of TRASER: Qwen2.5-VL vision tower, Qwen2.5 decoder, perceiver resampler."""
from traser_jax.modules.resampler import PerceiverResampler
from traser_jax.modules.text import TextDecoder, init_cache
from traser_jax.modules.vision import VisionTower, vision_layout

__all__ = ["PerceiverResampler", "TextDecoder", "VisionTower", "init_cache", "vision_layout"]

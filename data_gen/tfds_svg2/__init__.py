"""TFDS builder `svg2` over the SVG2 shards (importing this registers it).

See svg2_dataset_builder.py for how TFDS reads our ArrayRecord shards in place.
"""
from data_gen.tfds_svg2.svg2_dataset_builder import (Svg2, data_source, dataset_info, svg2_features,
                                                     write_metadata)

__all__ = ["Svg2", "data_source", "dataset_info", "svg2_features", "write_metadata"]

"""The TFDS builder `svg2`, and the metadata that lets TFDS read our shards in place.

How TFDS sees the shards (tensorflow-datasets 4.9.10, no TensorFlow needed):

* In place, zero copy (the main route). Our payload already is a
  `tf.train.Example` whose features are exactly those of `Svg2` below, and our
  ArrayRecord file names follow a TFDS file template
  ("{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"). So `write_metadata(dir)`
  writes TFDS's `dataset_info.json` and `features.json` next to the shards (shard
  lengths taken from our manifest, nothing else listed), and from then on
      tfds.builder_from_directory(dir).as_data_source("train")
  reads them; when `dir` is `<data_dir>/svg2/1.0.0`,
      tfds.data_source("svg2", data_dir=<data_dir>)
  does too. TFDS reads ArrayRecord with `array_record` and parses the Example
  with its own protobuf (`ExampleParserNp`) and decodes images with PIL: no TF.
  We chose this over preparing a copy because shards can be large and the same
  files then serve grain (`ShardReader`) and TFDS.
* Prepared copy (the regular GeneratorBasedBuilder route): `Svg2` reads any of
  our shard directories (ArrayRecord or TFRecord) given as the manual dir and
  writes TFDS's own ArrayRecord layout:
      Svg2(data_dir=D).download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=shard_dir))
  Also TF-free (frames are passed as already-encoded bytes).

What needs TensorFlow: `as_dataset` (tf.data) over either layout, and a TFDS
view of TFRecord shards in place (TFDS reads TFRecord only through tf.data;
`write_metadata` still writes it for users who have TF).

Features (names and kinds equal to data_gen.shards.payload): video_id and record
are Text (returned as bytes by the data source: `Record.from_json(x["record"])`),
frames is a Sequence of Image (decoded to uint8 [h, w, 3] each), frame_height and
frame_width are int64, image_format is Text.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.core.dataset_info import DatasetIdentity

from data_gen.record import SCHEMA_VERSION
from data_gen.shards import ShardError, ShardReader, read_manifest
from data_gen.shards.manifest import DATASET_NAME, FILE_SUFFIX, shard_file_name

DATASET_VERSION = f"{SCHEMA_VERSION}.0.0"  # the record schema version picks the dataset version
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"  # our shard names (manifest.shard_file_name)
_DESCRIPTION = ("SVG2 video scene graphs: per video, the record (objects with per-frame COCO RLE masks, "
                "attributes, typed relations with time spans) as JSON and its sampled frames.")


def svg2_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "video_id": tfds.features.Text(),
        "record": tfds.features.Text(),  # data_gen.record.Record.to_json()
        # encoding_format None: JPEG or PNG, whichever the shards hold; PIL sniffs it when decoding.
        "frames": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format=None)),
        "frame_height": tfds.features.Scalar(np.int64),
        "frame_width": tfds.features.Scalar(np.int64),
        "image_format": tfds.features.Text(),
    })


class Svg2(tfds.core.GeneratorBasedBuilder):
    """SVG2 scene-graph shards. Prepares from one of our shard directories (manual dir)."""

    name = DATASET_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Record schema version %d." % SCHEMA_VERSION}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass a shard directory written by data_gen.shards.ShardWriter (e.g. by "
        "`python -m data_gen.toyworld --out DIR`) as DownloadConfig(manual_dir=DIR).")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=_DESCRIPTION, features=svg2_features())

    def _split_generators(self, dl_manager):
        shard_dir = Path(dl_manager.manual_dir)
        split = read_manifest(shard_dir)["split"]
        return {split: self._generate_examples(shard_dir)}

    def _generate_examples(self, shard_dir: Path):
        for example in ShardReader(shard_dir):
            yield example.video_id, {
                "video_id": example.video_id,
                "record": example.record.to_json(),
                "frames": list(example.encoded_frames),  # bytes pass through the Image feature unchanged
                "frame_height": example.frame_height,
                "frame_width": example.frame_width,
                "image_format": example.image_format,
            }


def dataset_info(shard_dir: str | os.PathLike) -> tfds.core.DatasetInfo:
    """TFDS's DatasetInfo for the shards the manifest of `shard_dir` lists (in place)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    split, fmt = manifest["split"], manifest["format"]
    for index, shard in enumerate(manifest["shards"]):
        if shard["file"] != shard_file_name(split, fmt, index):
            raise ShardError(f"{shard_dir}: shard {index} is {shard['file']!r}, TFDS expects "
                             f"{shard_file_name(split, fmt, index)!r}")
    identity = DatasetIdentity(name=DATASET_NAME, version=tfds.core.Version(DATASET_VERSION), data_dir=os.fspath(shard_dir),
                               module_name=Svg2.__module__)
    info = tfds.core.DatasetInfo(builder=identity, description=_DESCRIPTION, features=svg2_features())
    template = naming.ShardedFileTemplate(data_dir=shard_dir, template=FILE_TEMPLATE, dataset_name=DATASET_NAME,
                                          split=split, filetype_suffix=FILE_SUFFIX[fmt])
    split_info = splits_lib.SplitInfo(name=split, shard_lengths=[s["records"] for s in manifest["shards"]],
                                      num_bytes=sum(s["bytes"] for s in manifest["shards"]),
                                      filename_template=template)
    info.set_splits(splits_lib.SplitDict([split_info]))
    info.set_file_format(FILE_SUFFIX[fmt])
    return info


def write_metadata(shard_dir: str | os.PathLike) -> None:
    """Write dataset_info.json and features.json next to the shards (atomically each).

    Rerun it after a writer added shards: TFDS sees only the shards listed then."""
    shard_dir = Path(shard_dir)
    info = dataset_info(shard_dir)
    staging = Path(tempfile.mkdtemp(prefix=".tfds-metadata-", dir=shard_dir))
    try:
        info.write_to_directory(staging)
        # features.json first: a dataset_info.json is what marks the directory as prepared.
        for name in sorted(os.listdir(staging), key=lambda n: n == "dataset_info.json"):
            os.replace(staging / name, shard_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def data_source(shard_dir: str | os.PathLike, split: str | None = None):
    """`tfds` ArrayRecord data source over our shards in place (writes the metadata when missing or stale)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if manifest["format"] != "arrayrecord":
        raise ShardError(f"{shard_dir} holds {manifest['format']} shards; TFDS data sources need ArrayRecord "
                         "(convert with Svg2(...).download_and_prepare(file_format='array_record', ...))")
    lengths = [s["records"] for s in manifest["shards"]]
    if not lengths:
        raise ShardError(f"{shard_dir} lists no complete shard yet: nothing for a data source to read")
    info_path = shard_dir / "dataset_info.json"
    if not info_path.exists() or _shard_lengths(shard_dir) != lengths:
        write_metadata(shard_dir)
    return tfds.builder_from_directory(shard_dir).as_data_source(split or manifest["split"])


def _shard_lengths(shard_dir: Path) -> list[int]:
    info = tfds.builder_from_directory(shard_dir).info
    return [int(n) for split in info.splits.values() for n in split.shard_lengths]

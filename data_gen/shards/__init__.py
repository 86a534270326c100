"""SVG2 shards: one `tf.train.Example` per video in ArrayRecord (primary) or
TFRecord files, next to a `manifest.json` that readers trust.

    from data_gen.shards import ShardWriter, ShardReader
    with ShardWriter("out/", format="arrayrecord") as w:
        w.write(record, frames)          # frames: uint8 [T, H, W, 3]
    reader = ShardReader("out/")
    example = reader[0]                  # .video_id, .record, .frames

Numpy, Pillow, array_record and google_crc32c only: no TensorFlow, no torch.
"""
from data_gen.shards.manifest import MANIFEST_NAME, ShardError, read_manifest
from data_gen.shards.payload import Example, decode_payload, encode_payload
from data_gen.shards.reader import ShardReader
from data_gen.shards.writer import ShardWriter

__all__ = ["Example", "MANIFEST_NAME", "ShardError", "ShardReader", "ShardWriter", "decode_payload",
           "encode_payload", "read_manifest"]

"""TFRecord files without TensorFlow: the framing tf.data reads.

Each record is `uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)`, little-endian, where the mask is
`((crc >> 15) | (crc << 17)) + 0xa282ead8` (mod 2**32).
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterator

import google_crc32c

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


class TFRecordError(ValueError):
    """A TFRecord file that is truncated or fails its checksums."""


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def write_record(f: BinaryIO, data: bytes) -> None:
    length = struct.pack("<Q", len(data))
    f.write(length + struct.pack("<I", masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data)))


def record_offsets(path: str | os.PathLike) -> list[int]:
    """Byte offset of every record in the file, found by hopping over the headers."""
    offsets, pos = [], 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while pos < size:
            header = f.read(_HEADER.size)
            if len(header) != _HEADER.size:
                raise TFRecordError(f"{path}: truncated header at byte {pos}")
            length, crc = _HEADER.unpack(header)
            if crc != masked_crc32c(header[:8]):
                raise TFRecordError(f"{path}: bad length checksum at byte {pos}")
            offsets.append(pos)
            pos += _HEADER.size + length + _FOOTER.size
            if pos > size:
                raise TFRecordError(f"{path}: record at byte {offsets[-1]} runs past the end ({size} bytes)")
            f.seek(pos)
    return offsets


def read_record_at(f: BinaryIO, offset: int) -> bytes:
    """The record starting at `offset`, checksums verified."""
    f.seek(offset)
    header = f.read(_HEADER.size)
    if len(header) != _HEADER.size:
        raise TFRecordError(f"truncated header at byte {offset}")
    length, crc = _HEADER.unpack(header)
    if crc != masked_crc32c(header[:8]):
        raise TFRecordError(f"bad length checksum at byte {offset}")
    data = f.read(length)
    footer = f.read(_FOOTER.size)
    if len(data) != length or len(footer) != _FOOTER.size:
        raise TFRecordError(f"truncated record at byte {offset}")
    if _FOOTER.unpack(footer)[0] != masked_crc32c(data):
        raise TFRecordError(f"bad data checksum in the record at byte {offset}")
    return data


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for offset in record_offsets(path):
            yield read_record_at(f, offset)

"""`tf.train.Example` protobufs, encoded and decoded by hand (no TensorFlow).

The wire format of the three messages involved (tensorflow/core/example):

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }   // entry: key = 1, value = 2
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                            Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

Features are written in sorted key order so equal inputs give equal bytes; the
decoder accepts any order and both packed and unpacked numeric lists, as protobuf
parsers must.
"""
from __future__ import annotations

import struct
from typing import Literal, Sequence

Kind = Literal["bytes", "float", "int64"]
Features = dict[str, tuple[Kind, list]]  # name -> (kind, values)

_KIND_FIELD = {"bytes": 1, "float": 2, "int64": 3}
_FIELD_KIND = {v: k for k, v in _KIND_FIELD.items()}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ProtoError(ValueError):
    """Bytes that are not a well-formed tf.train.Example."""


# -- encoding -------------------------------------------------------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(len(payload)) + payload


def _encode_feature(name: str, kind: Kind, values: Sequence) -> bytes:
    if kind == "bytes":
        body = b"".join(_len_field(1, bytes(v)) for v in values)
    elif kind == "int64":
        body = _len_field(1, b"".join(_varint(int(v)) for v in values)) if len(values) else b""
    elif kind == "float":
        body = _len_field(1, struct.pack(f"<{len(values)}f", *values)) if len(values) else b""
    else:
        raise ProtoError(f"feature {name!r} has kind {kind!r}, expected one of {tuple(_KIND_FIELD)}")
    return _len_field(_KIND_FIELD[kind], body)


def encode_example(features: Features) -> bytes:
    """{name: (kind, values)} -> serialized tf.train.Example (keys sorted)."""
    entries = b""
    for name in sorted(features):
        kind, values = features[name]
        entry = _len_field(1, name.encode("utf-8")) + _len_field(2, _encode_feature(name, kind, values))
        entries += _len_field(1, entry)
    return _len_field(1, entries)


# -- decoding -------------------------------------------------------------------

def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ProtoError("varint longer than 10 bytes")


def _fields(buf: memoryview):
    """Yields (field number, wire type, value) of one message; LEN values are memoryviews."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise ProtoError(f"field {field} claims {size} bytes, {len(buf) - pos} remain")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == _I32:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == _I64:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ProtoError(f"field {field} has unsupported wire type {wire}")
        if pos > len(buf):
            raise ProtoError(f"field {field} runs past the end of the message")
        yield field, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_feature(buf: memoryview) -> tuple[Kind | None, list]:
    kind, values = None, []
    for field, wire, body in _fields(buf):
        if field not in _FIELD_KIND or wire != _LEN:
            continue
        kind, values = _FIELD_KIND[field], []  # oneof: the last one set wins
        for f, w, v in _fields(body):
            if f != 1:
                continue
            if kind == "bytes":
                values.append(bytes(v))
            elif kind == "int64" and w == _LEN:  # packed
                p = 0
                while p < len(v):
                    x, p = _read_varint(v, p)
                    values.append(_signed64(x))
            elif kind == "int64":
                values.append(_signed64(v))
            elif kind == "float" and w == _LEN:  # packed
                values.extend(struct.unpack(f"<{len(v) // 4}f", v))
            else:
                values.append(struct.unpack("<f", v)[0])
    return kind, values


def decode_example(data: bytes | memoryview) -> Features:
    """Serialized tf.train.Example -> {name: (kind, values)}; kind is None for an empty Feature."""
    out: Features = {}
    for field, wire, features in _fields(memoryview(data)):
        if field != 1 or wire != _LEN:
            continue
        for f, w, entry in _fields(features):
            if f != 1 or w != _LEN:
                continue
            name, feature = "", memoryview(b"")
            for ef, ew, ev in _fields(entry):
                if ef == 1 and ew == _LEN:
                    name = bytes(ev).decode("utf-8")
                elif ef == 2 and ew == _LEN:
                    feature = ev
            out[name] = _decode_feature(feature)
    return out

"""Shards: payload codec, ArrayRecord/TFRecord round trips, manifest, atomic resumable
writes (a writer killed with SIGKILL mid-shard, then rerun), TFDS and independent readers.

This file is also the helper script of the SIGKILL test:
    python tests/test_shards.py OUT_DIR NUM_VIDEOS RECORDS_PER_SHARD
writes synthetic videos; with SHARDS_TEST_PAUSE_AFTER=N it touches OUT_DIR.ready
after N writes and then waits to be killed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_gen import rle
from data_gen.record import CAMERA_ID, Object, Record, RecordError, Relation, Video
from data_gen.shards import (MANIFEST_NAME, ShardError, ShardReader, ShardWriter, decode_payload, encode_payload,
                             read_manifest)
from data_gen.shards.example_proto import decode_example, encode_example

FORMATS = ("arrayrecord", "tfrecord")


def make_video(index: int, t: int = 3, h: int = 24, w: int = 32, smooth: bool = False) -> tuple[Record, np.ndarray]:
    """A valid synthetic record (3 objects, one absent on frame 0) and its frames."""
    rng = np.random.default_rng(1000 + index)
    fps = 2.0
    frame_indices = [2 * j for j in range(t)]
    video = Video(id=f"video-{index:04d}", source=f"synthetic://{index}", fps=fps, num_frames=2 * t, width=w,
                  height=h, frame_indices=frame_indices, timestamps=[f / fps for f in frame_indices])
    objects = []
    for k in range(3):
        masks = []
        for j in range(t):
            m = np.zeros((h, w), np.uint8)
            if not (k == 2 and j == 0):
                y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
                m[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = 1
            masks.append(rle.encode(m))
        objects.append(Object(id=k, name=["cube", "ball", "cone"][k], attributes=["red", f"size{k}"], masks=masks,
                              description=None if k else "a small cube", uncertain=k == 1))
    relations = [Relation(0, "left of", 1, "spatial", [(0.0, 1.0)]),
                 Relation(2, "moving toward", CAMERA_ID, "motion", [(0.5, 1.0), (t - 0.5, float(t))])]
    if smooth:  # gradients: JPEG reproduces them closely
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
        frames = np.stack([(base + 20 * j) % 256 for j in range(t)]).astype(np.uint8)
    else:
        frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    return Record(video, objects, relations).validate(), frames


def write_videos(out_dir, indices, **kwargs) -> None:
    with ShardWriter(out_dir, **kwargs) as writer:
        for i in indices:
            assert writer.write(*make_video(i))


def dir_bytes(path: Path) -> dict[str, bytes]:
    """Manifest and shards, the files whose bytes must be deterministic."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name == MANIFEST_NAME or
            p.name.startswith("svg2-")}


# -- payload ------------------------------------------------------------------------

def test_example_proto_equals_protobuf_serialization():
    from tfrecord import example_pb2  # an independent protobuf build of tf.train.Example

    features = {"b": ("bytes", [b"x", b"", bytes(range(256)) * 3]), "i": ("int64", [0, 1, -5, 2**62, -2**63]),
                "f": ("float", [0.5, -2.25, 1e-3]), "empty": ("int64", [])}
    ours = encode_example(features)
    proto = example_pb2.Example()
    for name in ["i", "b", "f", "empty"]:  # insertion order differs from ours on purpose
        kind, values = features[name]
        feature = proto.features.feature[name]
        {"bytes": feature.bytes_list, "int64": feature.int64_list, "float": feature.float_list}[kind].value.extend(
            values)
    assert ours == proto.SerializeToString(deterministic=True)
    parsed = example_pb2.Example.FromString(ours)
    assert list(parsed.features.feature["i"].int64_list.value) == features["i"][1]
    back = decode_example(proto.SerializeToString())
    assert back["b"] == features["b"] and back["i"] == features["i"] and back["empty"] == ("int64", [])
    np.testing.assert_allclose(back["f"][1], features["f"][1], rtol=1e-7)


def test_payload_round_trip_png_exact_and_checks_frames():
    record, frames = make_video(3)
    example = decode_payload(encode_payload(record, frames, image_format="png"))
    assert example.video_id == record.video.id and example.image_format == "png"
    assert example.record.to_dict() == record.to_dict()
    np.testing.assert_array_equal(example.frames, frames)
    with pytest.raises(ValueError, match=f"2 frames, video '{record.video.id}' has 3"):
        encode_payload(record, frames[:2])
    with pytest.raises(ValueError, match="aspect"):
        encode_payload(record, frames[:, :, :10])


def test_jpeg_frames_are_resized_to_max_side():
    record, frames = make_video(4, t=2, h=60, w=100, smooth=True)
    example = decode_payload(encode_payload(record, frames, image_format="jpeg", max_side=50, jpeg_quality=95))
    assert (example.frame_height, example.frame_width) == (30, 50)
    assert example.frames.shape == (2, 30, 50, 3) and example.frames.dtype == np.uint8
    expected = np.stack([np.asarray(Image.fromarray(f).resize((50, 30), Image.Resampling.BILINEAR)) for f in frames])
    err = np.abs(example.frames.astype(int) - expected.astype(int))
    assert err.mean() < 3.0, err.mean()


# -- writers and readers ----------------------------------------------------------

def test_round_trip_both_formats(tmp_path):
    for fmt in FORMATS:
        out = tmp_path / fmt
        write_videos(out, range(5), format=fmt, records_per_shard=2, image_format="png")
        reader = ShardReader(out)
        assert len(reader) == 5 and reader.ids() == [f"video-{i:04d}" for i in range(5)]
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("svg2-")) == [
            f"svg2-train.{'array_record' if fmt == 'arrayrecord' else 'tfrecord'}-{i:05d}" for i in range(3)]
        for i in [4, 0, 3, 1, 2, -1]:  # random access across shards
            record, frames = make_video(i % 5)
            example = reader[i]
            assert example.video_id == record.video.id
            assert example.record.to_dict() == record.to_dict()
            assert example.frames.shape == frames.shape
            np.testing.assert_array_equal(example.frames, frames)
        assert [e.video_id for e in reader] == reader.ids()
        with pytest.raises(IndexError, match="index 5"):
            reader[5]
        clone = pickle.loads(pickle.dumps(reader))  # grain hands data sources to worker processes
        assert clone[2].record.to_dict() == reader[2].record.to_dict()
        reader.close()


def test_reader_reopens_after_fork(tmp_path):
    write_videos(tmp_path, range(4), records_per_shard=2, image_format="png")
    reader = ShardReader(tmp_path)
    assert reader[3].video_id == "video-0003"  # parent opens handles before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must reopen its own handles
        try:
            os.write(write_end, json.dumps([reader[i].video_id for i in (3, 0)]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        got = json.loads(f.read())
    os.waitpid(pid, 0)
    assert got == ["video-0003", "video-0000"]


def test_manifest_content_and_checksums(tmp_path):
    write_videos(tmp_path, range(7), format="arrayrecord", records_per_shard=3, image_format="jpeg", max_side=16)
    manifest = read_manifest(tmp_path)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == manifest
    assert {k: manifest[k] for k in ("dataset", "split", "format", "image_format", "max_side", "jpeg_quality",
                                     "records_per_shard", "record_schema_version", "manifest_version")} == {
        "dataset": "svg2", "split": "train", "format": "arrayrecord", "image_format": "jpeg", "max_side": 16,
        "jpeg_quality": 90, "records_per_shard": 3, "record_schema_version": 1, "manifest_version": 1}
    records = [make_video(i)[0] for i in range(7)]
    assert manifest["counts"] == {"videos": 7, "objects": sum(len(r.objects) for r in records),
                                  "relations": sum(len(r.relations) for r in records),
                                  "frames": sum(len(r.video.frame_indices) for r in records)}
    assert [s["video_ids"] for s in manifest["shards"]] == [
        [f"video-{i:04d}" for i in ids] for ids in ([0, 1, 2], [3, 4, 5], [6])]
    for shard in manifest["shards"]:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
        assert shard["records"] == len(shard["video_ids"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".incomplete")]
    assert ShardReader(tmp_path)[6].frames.shape == (3, 12, 16, 3)  # 24x32 shrunk to max_side 16
    ShardReader(tmp_path).verify()
    shard = tmp_path / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=shard.name):
        ShardReader(tmp_path).verify()


def test_writes_are_deterministic(tmp_path):
    for fmt in FORMATS:
        for run in ("a", "b"):
            write_videos(tmp_path / f"{fmt}-{run}", range(5), format=fmt, records_per_shard=2)
        a, b = dir_bytes(tmp_path / f"{fmt}-a"), dir_bytes(tmp_path / f"{fmt}-b")
        assert len(a) == 4 and a == b  # manifest + 3 shards, byte-identical


def test_invalid_record_is_rejected_and_never_written(tmp_path):
    bad, bad_frames = make_video(1)
    bad.relations.append(Relation(0, "holding", 99, "functional", [(0.0, 1.0)]))
    with ShardWriter(tmp_path, records_per_shard=2) as writer:
        assert writer.write(*make_video(0))
        with pytest.raises(RecordError, match=r"relations\[2\]\.object refers to unknown object id 99"):
            writer.write(bad, bad_frames)
        record, frames = make_video(2)
        with pytest.raises(ValueError, match="1 frames"):
            writer.write(record, frames[:1])
        assert writer.done_ids() == {"video-0000"}
        assert writer.write(*make_video(3))
    reader = ShardReader(tmp_path)
    assert reader.ids() == ["video-0000", "video-0003"] and read_manifest(tmp_path)["counts"]["videos"] == 2


def test_resume_skips_done_videos_and_refuses_other_settings(tmp_path):
    write_videos(tmp_path, range(5), records_per_shard=2)
    with ShardWriter(tmp_path, records_per_shard=2) as writer:
        assert writer.done_ids() == {f"video-{i:04d}" for i in range(5)}
        written = [writer.write(*make_video(i)) for i in range(8)]
        with pytest.raises(ShardError, match="another ShardWriter"):
            ShardWriter(tmp_path).open()  # one writer per directory
    assert written == [False] * 5 + [True] * 3
    assert ShardReader(tmp_path).ids() == [f"video-{i:04d}" for i in range(8)]
    with pytest.raises(ShardError, match="image_format='jpeg'"):
        ShardWriter(tmp_path, image_format="png").open()


def test_error_inside_the_writer_drops_the_open_shard(tmp_path):
    try:
        with ShardWriter(tmp_path, records_per_shard=4) as writer:
            for i in range(6):
                writer.write(*make_video(i))
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert ShardReader(tmp_path).ids() == [f"video-{i:04d}" for i in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".writer.lock", MANIFEST_NAME, "svg2-train.array_record-00000"]


def _run_job(out_dir: Path, num_videos: int, per_shard: int, pause_after: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if pause_after is not None:
        env["SHARDS_TEST_PAUSE_AFTER"] = str(pause_after)
    return subprocess.Popen([sys.executable, __file__, str(out_dir), str(num_videos), str(per_shard)], env=env)


def test_writer_killed_mid_shard_then_rerun_completes(tmp_path):
    out, ready = tmp_path / "shards", tmp_path / "shards.ready"
    job = _run_job(out, 40, 8, pause_after=19)  # 2 shards committed, 3 videos in the open one
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert job.poll() is None, f"the writer exited early with {job.returncode}"
        assert time.monotonic() < deadline, "the writer never got ready"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    assert (out / "svg2-train.array_record-00002.incomplete").exists()  # killed mid-shard
    assert read_manifest(out)["counts"]["videos"] == 16
    assert ShardReader(out).ids() == [f"video-{i:04d}" for i in range(16)]  # readers see only committed shards
    # As if also killed between a shard's rename and the manifest update: an unlisted shard file.
    (out / "svg2-train.array_record-00002").write_bytes(b"left over by a killed writer")

    assert _run_job(out, 40, 8).wait() == 0
    manifest = read_manifest(out)
    ids = [vid for shard in manifest["shards"] for vid in shard["video_ids"]]
    assert ids == [f"video-{i:04d}" for i in range(40)] and len(set(ids)) == 40
    assert manifest["counts"]["videos"] == 40 and len(manifest["shards"]) == 5
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".incomplete")]
    reader = ShardReader(out)
    assert reader.ids() == ids and reader[17].record.to_dict() == make_video(17)[0].to_dict()
    # Dropping the unfinished shard whole makes the resumed job end exactly like one that ran through.
    write_videos(tmp_path / "clean", range(40), records_per_shard=8)
    assert dir_bytes(out) == dir_bytes(tmp_path / "clean")


# -- TFDS and independent readers ----------------------------------------------------

def test_tfds_data_source_reads_our_shards_in_place(tmp_path):
    import tensorflow_datasets as tfds

    from data_gen import tfds_svg2

    shard_dir = tmp_path / "svg2" / "1.0.0"  # TFDS's <data_dir>/<name>/<version> layout
    write_videos(shard_dir, range(5), records_per_shard=2, image_format="png")
    tfds_svg2.write_metadata(shard_dir)
    before = dir_bytes(shard_dir)
    source = tfds.data_source("svg2", data_dir=tmp_path, split="train")
    assert len(source) == 5
    for i in [4, 1]:
        record, frames = make_video(i)
        item = source[i]
        assert item["video_id"] == record.video.id.encode()
        assert Record.from_json(item["record"]).to_dict() == record.to_dict()
        assert (item["frame_height"], item["frame_width"], item["image_format"]) == (24, 32, b"png")
        np.testing.assert_array_equal(np.stack(item["frames"]), frames)
    assert dir_bytes(shard_dir) == before  # TFDS read our files, it did not rewrite them
    # A resumed writer adds shards; data_source() refreshes the metadata to list them.
    write_videos(shard_dir, range(5, 8), records_per_shard=2, image_format="png")
    source = tfds_svg2.data_source(shard_dir)
    assert len(source) == 8 and source[7]["video_id"] == b"video-0007"


def test_tfds_builder_prepares_from_tfrecord_shards(tmp_path):
    import tensorflow_datasets as tfds

    from data_gen import tfds_svg2

    write_videos(tmp_path / "tf", range(5), format="tfrecord", records_per_shard=2, image_format="png")
    builder = tfds_svg2.Svg2(data_dir=tmp_path / "tfds")
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "tf"))
    source = builder.as_data_source("train")
    got = {source[i]["video_id"].decode(): source[i] for i in range(len(source))}
    assert sorted(got) == [f"video-{i:04d}" for i in range(5)]
    record, frames = make_video(2)
    assert Record.from_json(got[record.video.id]["record"]).to_dict() == record.to_dict()
    np.testing.assert_array_equal(np.stack(got[record.video.id]["frames"]), frames)


def test_tfrecord_package_reads_our_tfrecords(tmp_path):
    from tfrecord.reader import tfrecord_loader
    from tfrecord.writer import TFRecordWriter  # its CRC uses the `crc32c` package, not google_crc32c

    write_videos(tmp_path, range(3), format="tfrecord", records_per_shard=8, image_format="png")
    path = tmp_path / read_manifest(tmp_path)["shards"][0]["file"]
    raw, data = [], path.read_bytes()
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        assert data[pos + 8:pos + 12] == TFRecordWriter.masked_crc(data[pos:pos + 8])
        body = data[pos + 12:pos + 12 + length]
        assert data[pos + 12 + length:pos + 16 + length] == TFRecordWriter.masked_crc(body)
        raw.append(body)
        pos += 16 + length
    assert len(raw) == 3
    examples = list(tfrecord_loader(str(path), None, {"video_id": "byte", "record": "byte", "frame_height": "int",
                                                      "frame_width": "int", "image_format": "byte"}))
    for i, ex in enumerate(examples):
        record, frames = make_video(i)
        assert bytes(ex["video_id"]) == record.video.id.encode()
        assert Record.from_json(bytes(ex["record"])).to_dict() == record.to_dict()
        assert (int(ex["frame_height"][0]), int(ex["frame_width"][0])) == (24, 32)
        assert bytes(ex["image_format"]) == b"png"
    from tfrecord import example_pb2
    frames_bytes = example_pb2.Example.FromString(raw[1]).features.feature["frames"].bytes_list.value
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in frames_bytes])
    np.testing.assert_array_equal(decoded, make_video(1)[1])


def test_tf_data_reads_our_tfrecords(tmp_path):
    tf = pytest.importorskip("tensorflow")

    write_videos(tmp_path, range(3), format="tfrecord", records_per_shard=2, image_format="png")
    files = [str(tmp_path / s["file"]) for s in read_manifest(tmp_path)["shards"]]
    spec = {"video_id": tf.io.FixedLenFeature([], tf.string), "record": tf.io.FixedLenFeature([], tf.string),
            "frames": tf.io.VarLenFeature(tf.string), "frame_height": tf.io.FixedLenFeature([], tf.int64),
            "frame_width": tf.io.FixedLenFeature([], tf.int64), "image_format": tf.io.FixedLenFeature([], tf.string)}
    items = list(tf.data.TFRecordDataset(files).map(lambda x: tf.io.parse_single_example(x, spec)))
    assert len(items) == 3
    for i, item in enumerate(items):
        record, frames = make_video(i)
        assert Record.from_json(item["record"].numpy()).to_dict() == record.to_dict()
        decoded = np.stack([tf.io.decode_png(b).numpy() for b in tf.sparse.to_dense(item["frames"]).numpy()])
        np.testing.assert_array_equal(decoded, frames)


if __name__ == "__main__":  # the SIGKILL test's writer job
    out_dir, num_videos, per_shard = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    pause_after = int(os.environ.get("SHARDS_TEST_PAUSE_AFTER", "0")) or None
    with ShardWriter(out_dir, records_per_shard=per_shard) as job_writer:
        written = 0
        for video in range(num_videos):
            if f"video-{video:04d}" in job_writer.done_ids():
                continue
            job_writer.write(*make_video(video))
            written += 1
            if written == pause_after:
                Path(str(out_dir) + ".ready").touch()
                time.sleep(600)  # the test kills us here, mid-shard

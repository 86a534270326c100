"""Benchmark converters on small fixtures written in each benchmark's published format."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_gen import rle
from data_gen.convert import ConvertError, iter_records, iter_videos
from data_gen.convert.__main__ import main as convert_main
from data_gen.convert.svg2_parquet import write_svg2_parquet
from data_gen.convert.vipseg import decode_value
from data_gen.record import Record, to_traser_json
from data_gen.shards import ShardReader


def _frame(t: int, h: int, w: int) -> np.ndarray:
    """A frame whose colour encodes its index (to check which frames were picked)."""
    return np.full((h, w, 3), 10 * t, np.uint8)


# -- PVSG ---------------------------------------------------------------------------------------
PVSG_ID = "0001_4164158586"


def _write_pvsg(root: Path, with_frames: bool = True) -> dict[int, np.ndarray]:
    """15 frames at 5 fps, 30x40: adult (1) always, ball (2) from frame 8, floor (3) the bottom rows."""
    h, w = 30, 40
    anno = {
        "objects": {"thing": ["adult", "ball"], "stuff": ["floor"]}, "relations": ["holding", "standing on"],
        "split": {"vidor": {"train": [], "val": [PVSG_ID]}},
        "data": [{"video_id": PVSG_ID, "meta": {"num_frames": 15, "width": w, "height": h, "fps": 5},
                  "objects": [{"object_id": 1, "category": "adult", "is_thing": True, "status": []},
                              {"object_id": 2, "category": "ball", "is_thing": True, "status": []},
                              {"object_id": 3, "category": "floor", "is_thing": False, "status": []}],
                  "relations": [[1, 2, "holding", [[0, 4], [10, 14]]], [1, 3, "standing on", [[0, 14]]]]}],
    }
    (root / "data").mkdir(parents=True)
    (root / "data" / "pvsg.json").write_text(json.dumps(anno))
    masks_dir = root / "data" / "vidor" / "masks" / PVSG_ID
    frames_dir = root / "data" / "vidor" / "frames" / PVSG_ID
    masks_dir.mkdir(parents=True)
    frames_dir.mkdir(parents=True)
    panoptic = {}
    for t in range(15):
        m = np.zeros((h, w), np.uint8)
        m[24:, :] = 3
        m[5 + t // 3:15 + t // 3, 5:12] = 1
        if t >= 8:
            m[10:14, 20 + t:24 + t] = 2
        image = Image.fromarray(m, "P")  # palette PNG: the pixel index is the object id
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
        image.save(masks_dir / f"{t:04d}.png")
        if with_frames:
            Image.fromarray(_frame(t, h, w)).save(frames_dir / f"{t:04d}.png")
        panoptic[t] = m
    return panoptic


def test_pvsg(tmp_path):
    panoptic = _write_pvsg(tmp_path)
    [video] = list(iter_videos("pvsg", tmp_path / "data", split="val"))
    record = video.record
    # clip(round(15 / 5), 4, 128) = 4 samples of linspace(0, 14, 4) = 0, 4.67, 9.33, 14
    assert record.video.frame_indices == [0, 5, 9, 14] and record.video.fps == 5.0
    assert [o.name for o in record.objects] == ["adult", "ball", "floor"]
    for o in record.objects:
        for j, f in enumerate(record.video.frame_indices):
            np.testing.assert_array_equal(rle.decode(o.masks[j]), panoptic[f] == o.id)
    assert record.objects[1].visible() == [False, False, True, True]
    # inclusive frame ranges at 5 fps: [0, 4] -> [0, 0.8] s, [10, 14] -> [2, 2.8] s
    assert record.relations[0].spans == [(0.0, 0.8), (2.0, 2.8)]
    assert to_traser_json(record)["relationships"][0] == [1, "holding", 2, [[0, 1], [2, 3]]]
    frames = video.load_frames()
    assert frames.shape == (4, 30, 40, 3) and [int(f[0, 0, 0]) for f in frames] == [0, 50, 90, 140]
    assert list(iter_videos("pvsg", tmp_path / "data", split="train")) == []
    with pytest.raises(ConvertError, match="split 'test'"):
        list(iter_videos("pvsg", tmp_path / "data" / "pvsg.json", split="test"))


def test_convert_cli_writes_shards_and_evaluate_reads_annotations(tmp_path, capsys):
    _write_pvsg(tmp_path)
    out = tmp_path / "shards"
    assert convert_main(["pvsg", str(tmp_path / "data"), str(out), "--records-per-shard", "2"]) == 0
    with ShardReader(out) as reader:
        [example] = list(reader)
    expected = next(iter_records("pvsg", tmp_path / "data"))
    assert example.record.to_dict() == expected.to_dict()
    assert example.frames.shape == (4, 30, 40, 3)
    # a second run resumes: nothing new is written
    assert convert_main(["pvsg", str(tmp_path / "data"), str(out)]) == 0
    assert "wrote 0 videos" in capsys.readouterr().out
    # evaluation straight from the benchmark's annotations (no frames needed)
    from traser_jax.evaluate import main as evaluate_main

    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps(dict(to_traser_json(expected), video_id=PVSG_ID)) + "\n")
    metrics = tmp_path / "m.json"
    assert evaluate_main(["--benchmark", "pvsg", "--gt", str(tmp_path / "data"), "--pred", str(pred),
                          "--out", str(metrics), "--bootstrap", "0"]) == 0
    result = json.loads(metrics.read_text())
    assert result["triplet_recall_tiou0.5"] == 1.0 and result["attribute_recall"] is None


def test_convert_cli_errors_name_the_problem(tmp_path, capsys):
    _write_pvsg(tmp_path, with_frames=False)
    assert convert_main(["pvsg", str(tmp_path / "data"), str(tmp_path / "out")]) == 2
    assert "no image for sampled frame(s) [0, 5, 9, 14]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main(["pvsg", str(tmp_path / "data"), str(tmp_path / "out"), "--fps", "3"])
    assert "--fps does not apply to pvsg" in capsys.readouterr().err


# -- VidOR ---------------------------------------------------------------------------------------
def _write_vidor(root: Path, h: int = 32, w: int = 48) -> dict:
    """20 frames at 10 fps: adult (tid 0) moves right; baby_seat (tid 1) appears at frame 10."""
    trajectories = []
    for t in range(20):
        boxes = [{"tid": 0, "bbox": {"xmin": t, "ymin": 2, "xmax": t + 7, "ymax": 9}, "generated": 0}]
        if t >= 10:
            boxes.append({"tid": 1, "bbox": {"xmin": 30, "ymin": 20, "xmax": 60, "ymax": 40}, "generated": 1})
        trajectories.append(boxes)
    anno = {"version": "VERSION 1.0", "video_id": "5159741010", "video_hash": "6c7a58bb458b271f2d9b45de63f3a2",
            "video_path": "0000/5159741010.mp4", "frame_count": 20, "fps": 10, "width": w, "height": h,
            "subject/objects": [{"tid": 0, "category": "adult"}, {"tid": 1, "category": "baby_seat"}],
            "trajectories": trajectories,
            "relation_instances": [
                {"subject_tid": 0, "object_tid": 1, "predicate": "next_to", "begin_fid": 10, "end_fid": 20},
                {"subject_tid": 0, "object_tid": 1, "predicate": "watch", "begin_fid": 0, "end_fid": 5}]}
    folder = root / "annotation" / "validation" / "0000"
    folder.mkdir(parents=True)
    (folder / "5159741010.json").write_text(json.dumps(anno))
    return anno


def test_vidor_with_ffmpeg_frame_folder(tmp_path):
    _write_vidor(tmp_path)
    frames = tmp_path / "frames" / "0000" / "5159741010"
    frames.mkdir(parents=True)
    for t in range(20):  # ffmpeg numbers extracted frames from 1
        Image.fromarray(_frame(t, 32, 48)).save(frames / f"{t + 1:06d}.jpg", quality=95)
    [video] = list(iter_videos("vidor", tmp_path / "annotation", frames_dir=tmp_path / "frames"))
    record = video.record
    # clip(round(20 / 10), 4, 128) = 4: linspace(0, 19, 4) = 0, 6.33, 12.67, 19
    assert record.video.frame_indices == [0, 6, 13, 19]
    assert [o.name for o in record.objects] == ["adult", "baby seat"]
    # inclusive box at frame 13: x 13..20, y 2..9 -> 8x8 pixels, bbox (13, 2, 21, 10) exclusive
    assert rle.area(record.objects[0].masks[2]) == 64 and rle.bbox(record.objects[0].masks[2]) == (13, 2, 21, 10)
    # the seat's box is clipped to the 48x32 frame: x 30..47, y 20..31
    assert record.objects[1].visible() == [False, False, True, True]
    assert rle.bbox(record.objects[1].masks[3]) == (30, 20, 48, 32)
    # end_fid is exclusive: [10, 20) at 10 fps -> [1.0, 1.9] s; [0, 5) -> [0.0, 0.4] s
    assert [(r.predicate, r.spans) for r in record.relations] == [("next to", [(1.0, 1.9)]), ("watch", [(0.0, 0.4)])]
    pixels = video.load_frames()[:, 0, 0, 0].astype(int)
    assert np.all(np.abs(pixels - np.array([0, 60, 130, 190])) <= 3)  # jpeg


def test_vidor_from_video_file(tmp_path):
    av = pytest.importorskip("av")
    _write_vidor(tmp_path, h=32, w=48)
    path = tmp_path / "video" / "0000" / "5159741010.mp4"
    path.parent.mkdir(parents=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for t in range(20):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(t, 32, 48), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    [video] = list(iter_videos("vidor", tmp_path / "annotation", videos_dir=tmp_path / "video"))
    pixels = video.load_frames()[:, 10, 10, 0].astype(int)
    assert np.all(np.abs(pixels - np.array([0, 60, 130, 190])) <= 12), pixels  # lossy codec


def test_vidor_bad_annotation(tmp_path):
    anno = _write_vidor(tmp_path)
    anno["relation_instances"][0]["object_tid"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(anno))
    with pytest.raises(ConvertError, match=r"relation_instances\[0\] refers to tid 0 or 7"):
        list(iter_videos("vidor", tmp_path / "bad.json"))


# -- VIPSeg ---------------------------------------------------------------------------------------
def test_vipseg(tmp_path):
    root = tmp_path / "VIPSeg"
    (root / "panomasks" / "v1").mkdir(parents=True)
    (root / "imgs" / "v1").mkdir(parents=True)
    categories = [{"id": 0, "name": "wall", "isthing": 0, "color": [120, 120, 120]},
                  {"id": 28, "name": "sky", "isthing": 0, "color": [255, 9, 92]},
                  {"id": 60, "name": "person", "isthing": 1, "color": [11, 200, 200]}]
    (root / "panoVIPSeg_categories.json").write_text(json.dumps(categories))
    (root / "val.txt").write_text("v1\n")
    masks = {}
    for t in range(10):
        m = np.zeros((24, 32), np.uint16)
        m[:8] = 29  # sky: category 28 -> value 29
        m[8:] = 1  # wall: category 0 -> value 1
        m[10:20, 2 + t:8 + t] = 6100  # person instance 0: (60 + 1) * 100
        if t % 2 == 0:
            m[12:18, 20:24] = 6101  # person instance 1
        Image.fromarray(m).save(root / "panomasks" / "v1" / f"{t:08d}.png")  # 16-bit PNG
        Image.fromarray(_frame(t, 24, 32)).save(root / "imgs" / "v1" / f"{t:08d}.jpg", quality=95)
        masks[t] = m
    assert decode_value(6101) == (60, True) and decode_value(29) == (28, False)
    [video] = list(iter_videos("vipseg", root, split="val"))
    record = video.record
    # 10 annotated frames at the assumed 5 fps: 4 samples of linspace(0, 9, 4) = 0, 3, 6, 9
    assert record.video.frame_indices == [0, 3, 6, 9] and record.relations == []
    # objects numbered by panoptic value: 1 wall, 29 sky, 6100 person, 6101 person
    assert [(o.id, o.name) for o in record.objects] == [(1, "wall"), (2, "sky"), (3, "person"), (4, "person")]
    value = {1: 1, 2: 29, 3: 6100, 4: 6101}
    for o in record.objects:
        for j, f in enumerate(record.video.frame_indices):
            np.testing.assert_array_equal(rle.decode(o.masks[j]), masks[f] == value[o.id])
    assert record.objects[3].visible() == [True, False, True, False]
    pixels = video.load_frames()[:, 0, 0, 0].astype(int)
    assert np.all(np.abs(pixels - np.array([0, 30, 60, 90])) <= 3)


# -- SVG2 parquet -------------------------------------------------------------------------------------
def _svg2_row() -> dict:
    h, w = 16, 20
    box = np.zeros((h, w), np.uint8)
    box[2:6, 3:9] = 1
    return {
        "video_id": "sav_000123", "video_path": "sav_000123.mp4", "fps": 24.0, "num_frames": 96,
        "width": w, "height": h, "sampled_frames": [0, 32, 63, 95], "timestamps": [0.0, 32 / 24, 63 / 24, 95 / 24],
        "objects": [{"object_id": 0, "label": "person", "attributes": ["red jacket", "walking"],
                     "description": "A person in a red jacket.", "uncertain": False},
                    {"object_id": 4, "label": "dog", "attributes": [], "description": None, "uncertain": True}],
        "relationships": [{"subject_id": 0, "predicate": "walking with", "object_id": 4, "type": "social",
                           "time_spans": [[0.0, 2.0]]},
                          {"subject_id": 0, "predicate": "looking at", "object_id": -1, "type": "attentional",
                           "time_spans": [[1.0, 1.5], [3.0, 3.9]]}],
        "masks": [{"frame": 0, "object_id": 0, **rle.encode(box)}, {"frame": 63, "object_id": 4, **rle.encode(box)},
                  {"frame": 95, "object_id": 0, **rle.encode(box)}],
    }


def test_svg2_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = _svg2_row()
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "test-00000.parquet")
    # the same row with nested columns stored as JSON strings, as some hub exports keep them
    as_json = dict(row, **{k: json.dumps(row[k]) for k in ("objects", "relationships", "masks")})
    (tmp_path / "json").mkdir()
    pq.write_table(pa.Table.from_pylist([as_json]), tmp_path / "json" / "part.parquet")
    first = next(iter_records("svg2", tmp_path / "test-00000.parquet"))
    second = next(iter_records("svg2", tmp_path / "json"))
    assert first.to_dict() == second.to_dict()
    assert first.video.frame_indices == [0, 32, 63, 95]
    assert [(o.id, o.name, o.uncertain) for o in first.objects] == [(0, "person", False), (4, "dog", True)]
    assert first.objects[0].visible() == [True, False, False, True]
    assert first.objects[1].visible() == [False, False, True, False]
    assert first.relations[1].object == -1 and first.relations[1].category == "attentional"
    # round trip through the writer
    write_svg2_parquet([first], tmp_path / "round.parquet")
    again = next(iter_records("svg2", tmp_path / "round.parquet"))
    assert again.to_dict() == first.to_dict() and isinstance(again, Record)
    # frames from a folder named by source frame number
    frames = tmp_path / "frames" / "sav_000123"
    frames.mkdir(parents=True)
    for f in (0, 32, 63, 95):
        Image.fromarray(_frame(f // 8, 16, 20)).save(frames / f"{f:05d}.png")
    [video] = list(iter_videos("svg2", tmp_path / "round.parquet", frames_dir=tmp_path / "frames"))
    assert [int(x) for x in video.load_frames()[:, 0, 0, 0]] == [0, 40, 70, 110]
    bad = dict(row, masks=[{"frame": 5, "object_id": 0, **rle.encode(np.zeros((16, 20), np.uint8))}])
    pq.write_table(pa.Table.from_pylist([bad]), tmp_path / "bad.parquet")
    with pytest.raises(ConvertError, match="not a listed object and sampled frame"):
        list(iter_records("svg2", tmp_path / "bad.parquet"))

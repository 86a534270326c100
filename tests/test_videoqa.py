"""VideoQA with scene graphs against a loopback OpenAI-compatible server (real `openai` client)."""
from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from data_gen.record import to_traser_json
from data_gen.shards import ShardWriter
from openai_loopback import LoopbackOpenAI, completion
from test_evaluate import _record
from traser_jax.eval import llm, videoqa

QUESTIONS = [
    {"id": "q1", "video_id": "v1", "question": "What is the woman riding?", "options": ["horse", "bicycle", "car"],
     "answer": 1},
    {"id": "q2", "video_id": "v1", "question": "What does the woman look at?", "options": ["the camera", "a dog"],
     "answer": 0},
    {"id": "q3", "video_id": "v2", "question": "How many objects are there?", "options": ["one", "two", "three"],
     "answer": 2},
]
TRUTH = {q["question"]: "ABC"[q["answer"]] for q in QUESTIONS}


def _write_inputs(tmp_path):
    questions = tmp_path / "qa.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    shards = tmp_path / "shards"
    with ShardWriter(shards, records_per_shard=8) as writer:
        for vid in ("v1", "v2"):
            frames = np.stack([np.full((32, 32, 3), 20 * t, np.uint8) for t in range(10)])
            writer.write(_record(vid), frames)
    return questions, shards


class _Policy:
    """Answers right only when the scene graph is in the message (else "A"); q2 with the
    graph alone first gets a garbage reply; q3 with both inputs always gets an invalid letter."""

    def __init__(self):
        self.garbled = False
        self.lock = threading.Lock()

    def __call__(self, body, index):
        parts = body["messages"][1]["content"]
        images = [p for p in parts if p["type"] == "image_url"]
        texts = [p["text"] for p in parts if p["type"] == "text"]
        has_graph = any(t.startswith("Scene graph of the video") for t in texts)
        question = texts[-1].split("\n", 1)[0].removeprefix("Question: ")
        if question == QUESTIONS[1]["question"] and has_graph and not images:
            with self.lock:
                if not self.garbled:
                    self.garbled = True
                    return 200, completion("I think it is A"), {}
        if question == QUESTIONS[2]["question"] and has_graph and images:
            return 200, completion(json.dumps({"answer": "Z"})), {}
        letter = TRUTH[question] if has_graph else "A"
        return 200, completion(json.dumps({"answer": letter}), prompt_tokens=50, completion_tokens=5), {}


def test_videoqa_modes_and_malformed_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-videoqa")
    questions, shards = _write_inputs(tmp_path)
    with LoopbackOpenAI(_Policy()) as server:
        client = llm.make_client(server.url)
        result = videoqa.run(videoqa.load_questions(questions), client, "vlm",
                             graphs=videoqa.load_graphs(shards),
                             frames=videoqa.FrameSource(shards, max_frames=4), attempts=2, concurrency=3)
        # 9 asks + 1 retry after the garbage reply + 1 retry of q3/both (still invalid: unanswered)
        assert len(server.requests) == 11
        video_only = [b for b in server.requests
                      if not any(p["type"] == "text" and p["text"].startswith("Scene graph")
                                 for p in b["messages"][1]["content"])]
        images = [p for p in video_only[0]["messages"][1]["content"] if p["type"] == "image_url"]
        # 10 stored frames, at most 4 sent, as JPEG data URLs
        assert len(images) == 4
        url = images[0]["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and image.size == (32, 32)
        schema = server.requests[0]["response_format"]["json_schema"]
        assert schema["strict"] is True and schema["schema"]["properties"]["answer"]["enum"][:2] == ["A", "B"]
    # video only: always "A" -> only q2 (answer A) is right: 1/3
    assert result["modes"]["video"] == {"accuracy": pytest.approx(1 / 3), "correct": 1, "unanswered": 0}
    # graph only: all right after the retry: 3/3
    assert result["modes"]["graph"] == {"accuracy": 1.0, "correct": 3, "unanswered": 0}
    # both: q1, q2 right, q3 never answered validly: 2/3
    assert result["modes"]["both"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "unanswered": 1}
    assert result["per_question"]["q3"]["both"] is None
    # 11 replies arrived; 3 were malformed (garbage once, "Z" twice)
    assert result["usage"]["requests"] == 11 and result["usage"]["malformed_answers"] == 3


def test_videoqa_cli_with_jsonl_graphs_and_frame_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-videoqa")
    questions, _ = _write_inputs(tmp_path)
    graphs = tmp_path / "graphs.jsonl"
    graphs.write_text("\n".join(json.dumps(dict(to_traser_json(_record(v)), video_id=v)) for v in ("v1", "v2")))
    frames = tmp_path / "frames"
    for vid in ("v1", "v2"):
        (frames / vid).mkdir(parents=True)
        for t in range(3):
            Image.fromarray(np.full((24, 40, 3), 50 * t, np.uint8)).save(frames / vid / f"{t:03d}.png")
    out = tmp_path / "qa_result.json"
    with LoopbackOpenAI(_Policy()) as server:
        rc = videoqa.main(["--questions", str(questions), "--model", "vlm", "--base-url", server.url,
                           "--graphs", str(graphs), "--frames", str(frames), "--modes", "video,graph",
                           "--attempts", "2", "--out", str(out)])
        assert rc == 0
        sent = [p for b in server.requests for p in b["messages"][1]["content"] if p["type"] == "image_url"]
        assert len(sent) == 3 * 3  # 3 video-mode questions x 3 frames each
    printed = capsys.readouterr().out
    assert "graph" in printed and "1.000" in printed
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"video", "graph"} and result["modes"]["graph"]["accuracy"] == 1.0
    # graph text the model saw
    text = videoqa.graph_to_text(json.loads(graphs.read_text().splitlines()[0]))
    assert "1: woman (green coat)" in text and "woman 1 riding bicycle 2 during 2-7 s" in text
    assert "woman 1 looking at the camera during 0-1 s, 8-9 s" in text


def test_videoqa_input_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video_id": "v", "question": "?", "options": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(videoqa.QAInputError, match=r"answer must be an option index in \[0, 2\)"):
        videoqa.load_questions(bad)
    questions, _ = _write_inputs(tmp_path)
    qs = videoqa.load_questions(questions)
    with pytest.raises(videoqa.QAInputError, match="need a scene graph for every video; missing: \\['v2'\\]"):
        videoqa.run(qs, client=None, model="m", graphs={"v1": {}}, modes=("graph",))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert videoqa.main(["--questions", str(questions), "--model", "m", "--modes", "graph",
                         "--graphs", str(tmp_path / "shards")]) == 2

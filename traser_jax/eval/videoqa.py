"""VideoQA with scene graphs: does a TRASER graph help a model answer questions about a video?

    python -m traser_jax.eval.videoqa --questions QA.jsonl --model NAME [--base-url URL]
        [--graphs PRED.jsonl|SHARD_DIR] [--frames SHARD_DIR|FOLDER] [--modes video,graph,both]
        [--max-frames 8] [--out RESULT.json]

Questions: JSONL, one multiple-choice question a line (AGQA / Perception Test
style): {"video_id", "question", "options": [..], "answer": index of the right
option}, optionally "id". Graphs: TRASER output JSON + video_id per line (e.g.
a model's predictions) or a shard directory (its records' graphs). Frames: a
shard directory, or a folder with one subfolder of images per video; up to
--max-frames evenly spaced frames go into the chat message as base64 JPEGs.

Each question is asked once per mode: "video" (frames only), "graph" (the
scene graph as text only) and "both"; the answer must be {"answer": letter}
under a strict JSON schema. A malformed answer is asked again (--attempts);
one that stays malformed counts as wrong and is reported as unanswered. The
paper reports Perception Test 66.8 -> 71.4 and AGQA 2.0 25.9 -> 26.3 when
TRASER's graph is added to the video.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tqdm import tqdm

from traser_jax.eval import llm

MODES = ("video", "graph", "both")
SYSTEM_PROMPT = ("You answer multiple-choice questions about a video. You are given frames of the video, a scene "
                 "graph of it, or both. Choose the single best option and reply as JSON: {\"answer\": \"<letter>\"}.")


class QAInputError(ValueError):
    """A question, graph or frame source that cannot be used; the message names the field."""


@dataclass
class Question:
    qid: str
    video_id: str
    question: str
    options: list[str]
    answer: int


def load_questions(path: str | Path) -> list[Question]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as err:
            raise QAInputError(f"{where}: not valid JSON ({err.msg})") from None
        for key in ("video_id", "question", "options", "answer"):
            if key not in d:
                raise QAInputError(f"{where}: missing field {key!r}")
        options = d["options"]
        if not (isinstance(options, list) and 2 <= len(options) <= 26 and all(isinstance(o, str) for o in options)):
            raise QAInputError(f"{where}: options must be a list of 2 to 26 strings, got {options!r}")
        answer = d["answer"]
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options)):
            raise QAInputError(f"{where}: answer must be an option index in [0, {len(options)}), got {answer!r}")
        out.append(Question(str(d.get("id", f"q{n}")), str(d["video_id"]), str(d["question"]), options, answer))
    if not out:
        raise QAInputError(f"{path}: no questions")
    return out


# -- scene graphs ----------------------------------------------------------------------
def graph_to_text(graph: Mapping[str, Any]) -> str:
    """A TRASER output JSON as plain sentences a language model reads easily."""
    names = {-1: "the camera"}
    lines = ["Scene graph of the video (objects are numbered; times are in seconds from the start):", "Objects:"]
    for entry in graph.get("objects", []):
        key = next((k for k in entry if isinstance(k, str) and k.startswith("object ")), None)
        if key is None:
            continue
        number, name = key.split(" ", 1)[1], str(entry[key])
        names[int(number)] = f"{name} {number}"
        attrs = [a for a in entry.get("attributes", []) if isinstance(a, str)]
        lines.append(f"  {number}: {name}" + (f" ({', '.join(attrs)})" if attrs else ""))
    lines.append("Relationships:")
    for item in graph.get("relationships", []):
        try:
            s, predicate, o, spans = item[:4]
            when = ", ".join(f"{a}-{b} s" if a != b else f"{a} s" for a, b in spans)
            lines.append(f"  {names.get(int(s), f'object {s}')} {predicate} {names.get(int(o), f'object {o}')} "
                         f"during {when}")
        except (TypeError, ValueError):
            continue
    return "\n".join(lines)


def _is_shard_dir(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").exists()


def load_graphs(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    if _is_shard_dir(path):
        from data_gen.record import to_traser_json
        from data_gen.shards import ShardReader

        with ShardReader(path) as reader:
            return {ex.video_id: to_traser_json(ex.record) for ex in reader}
    graphs = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                d = json.loads(line)
                graphs[str(d["video_id"])] = d
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise QAInputError(f"{path}:{n}: expected a TRASER JSON object with a video_id ({err})") from None
    return graphs


# -- frames -------------------------------------------------------------------------------
class FrameSource:
    """Frames per video from a shard directory or a folder of per-video image folders."""

    def __init__(self, path: str | Path, max_frames: int = 8, max_side: int = 448):
        self.path = Path(path)
        self.max_frames, self.max_side = max_frames, max_side
        self._reader = None
        if _is_shard_dir(self.path):
            from data_gen.shards import ShardReader

            self._reader = ShardReader(self.path)
            self._index = {vid: i for i, vid in enumerate(self._reader.ids())}
        elif not self.path.is_dir():
            raise QAInputError(f"--frames {self.path}: expected a shard directory or a folder of video folders")

    def has(self, video_id: str) -> bool:
        if self._reader is not None:
            return video_id in self._index
        return any(p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in (self.path / video_id).glob("*"))

    def jpegs(self, video_id: str) -> list[bytes]:
        """Up to max_frames evenly spaced frames, JPEG-encoded, the longer side at most max_side."""
        if self._reader is not None:
            frames = self._reader[self._index[video_id]].frames
            images = [Image.fromarray(frames[i]) for i in self._pick(len(frames))]
        else:
            files = sorted(p for p in (self.path / video_id).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            images = []
            for i in self._pick(len(files)):
                with Image.open(files[i]) as image:
                    images.append(image.convert("RGB"))
        out = []
        for image in images:
            image.thumbnail((self.max_side, self.max_side))
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=85)
            out.append(buf.getvalue())
        return out

    def _pick(self, n: int) -> list[int]:
        if n <= self.max_frames:
            return list(range(n))
        return sorted(set(np.linspace(0, n - 1, self.max_frames).round().astype(int).tolist()))


# -- asking ---------------------------------------------------------------------------------
def build_messages(question: Question, graph_text: str | None, jpegs: list[bytes] | None) -> list[dict]:
    content: list[dict] = []
    if jpegs:
        content.append({"type": "text", "text": f"{len(jpegs)} frames of the video, in order:"})
        content += [{"type": "image_url",
                     "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(j).decode("ascii")}}
                    for j in jpegs]
    if graph_text:
        content.append({"type": "text", "text": graph_text})
    letters = string.ascii_uppercase
    options = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(question.options))
    content.append({"type": "text", "text": f"Question: {question.question}\nOptions:\n{options}\n"
                                            f"Answer with the letter of the correct option."})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def answer_schema(n_options: int) -> dict:
    return {"type": "object", "properties": {"answer": {"type": "string",
                                                        "enum": list(string.ascii_uppercase[:n_options])}},
            "required": ["answer"], "additionalProperties": False}


def ask(client, model: str, question: Question, messages: list[dict], attempts: int, usage: llm.Usage,
        max_tokens: int = 32, temperature: float | None = 0.0) -> int | None:
    """The chosen option index, or None when every attempt came back malformed."""
    letters = string.ascii_uppercase[:len(question.options)]
    for _ in range(attempts):
        answer = llm.chat_json(client, model, messages, answer_schema(len(question.options)),
                               schema_name="multiple_choice", usage=usage, max_tokens=max_tokens,
                               temperature=temperature)
        value = answer.value.get("answer") if isinstance(answer.value, dict) else None
        if isinstance(value, str) and value.strip().upper() in letters and len(value.strip()) == 1:
            return letters.index(value.strip().upper())
        usage.malformed_answers += 1
    return None


def run(questions: list[Question], client, model: str, *, graphs: Mapping[str, dict] | None = None,
        frames: FrameSource | None = None, modes: tuple[str, ...] = MODES, attempts: int = 3,
        concurrency: int = 4, price_input_per_m: float | None = None, price_output_per_m: float | None = None,
        max_tokens: int = 32, temperature: float | None = 0.0) -> dict[str, Any]:
    """Ask every question in every mode; accuracy per mode plus per-question answers."""
    for mode in modes:
        if mode not in MODES:
            raise QAInputError(f"mode {mode!r} is not one of {MODES}")
    need_graph = any(m in ("graph", "both") for m in modes)
    need_video = any(m in ("video", "both") for m in modes)
    videos = sorted({q.video_id for q in questions})
    if need_graph:
        missing = [v for v in videos if graphs is None or v not in graphs]
        if missing:
            raise QAInputError(f"modes {modes} need a scene graph for every video; missing: {missing[:8]}")
    if need_video:
        missing = [v for v in videos if frames is None or not frames.has(v)]
        if missing:
            raise QAInputError(f"modes {modes} need frames for every video; missing: {missing[:8]}")
    graph_texts = {v: graph_to_text(graphs[v]) for v in videos} if need_graph else {}
    jpegs = {v: frames.jpegs(v) for v in videos} if need_video else {}

    jobs = [(q, mode) for q in questions for mode in modes]

    def one(job):
        q, mode = job
        usage = llm.Usage()
        messages = build_messages(q, graph_texts.get(q.video_id) if mode != "video" else None,
                                  jpegs.get(q.video_id) if mode != "graph" else None)
        return q, mode, ask(client, model, q, messages, attempts, usage, max_tokens, temperature), usage

    total = llm.Usage(price_input_per_m=price_input_per_m, price_output_per_m=price_output_per_m)
    answers: dict[str, dict[str, Any]] = {q.qid: {"video_id": q.video_id, "answer": q.answer} for q in questions}
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for q, mode, choice, usage in tqdm(pool.map(one, jobs), total=len(jobs), desc="videoqa", unit="question"):
            answers[q.qid][mode] = choice
            for key in ("requests", "prompt_tokens", "completion_tokens", "malformed_answers"):
                setattr(total, key, getattr(total, key) + getattr(usage, key))
    result: dict[str, Any] = {"model": model, "questions": len(questions), "modes": {}}
    for mode in modes:
        correct = sum(answers[q.qid][mode] == q.answer for q in questions)
        unanswered = sum(answers[q.qid][mode] is None for q in questions)
        result["modes"][mode] = {"accuracy": correct / len(questions), "correct": correct,
                                 "unanswered": unanswered}
    result["usage"] = total.as_dict()
    result["per_question"] = answers
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traser_jax.eval.videoqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True,
                        help="multiple-choice JSONL {video_id, question, options, answer}")
    parser.add_argument("--model", required=True)
    parser.add_argument("--base-url",
                        help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL); key: $OPENAI_API_KEY")
    parser.add_argument("--graphs", help="TRASER JSON + video_id per line, or a shard directory")
    parser.add_argument("--frames", help="a shard directory, or a folder with one image folder per video")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of video,graph,both")
    parser.add_argument("--max-frames", type=int, default=8)
    parser.add_argument("--attempts", type=int, default=3, help="asks per question before it counts as unanswered")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length cap (raise it for reasoning models)")
    parser.add_argument("--price-input", type=float, help="USD per million prompt tokens")
    parser.add_argument("--price-output", type=float, help="USD per million completion tokens")
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    try:
        questions = load_questions(args.questions)
        graphs = load_graphs(args.graphs) if args.graphs else None
        frames = FrameSource(args.frames, max_frames=args.max_frames) if args.frames else None
        client = llm.make_client(args.base_url)
        result = run(questions, client, args.model, graphs=graphs, frames=frames,
                     modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), attempts=args.attempts,
                     concurrency=args.concurrency, price_input_per_m=args.price_input,
                     price_output_per_m=args.price_output, max_tokens=args.max_tokens)
    except (QAInputError, llm.LLMError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'mode':8s} {'accuracy':>9s} {'correct':>8s} {'unanswered':>11s}   ({result['questions']} questions)")
    for mode, r in result["modes"].items():
        print(f"{mode:8s} {r['accuracy']:9.3f} {r['correct']:8d} {r['unanswered']:11d}")
    print("usage:", json.dumps(result["usage"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

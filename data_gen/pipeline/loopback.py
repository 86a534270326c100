"""A loopback OpenAI-compatible endpoint (stdlib only) for tests and offline demos.

`LoopbackServer` answers `POST /v1/chat/completions` the way a real endpoint
does (JSON body, `usage` token counts, HTTP errors), so the real `openai` client
runs against it unchanged. Replies come from a responder (default:
`SceneResponder`, which answers the pipeline's four schemas from what the request
shows); faults can be queued to test the client: "malformed", "truncated",
"schema", "empty", 429 and 500. A test that scripts whole HTTP replies passes
`handle(body, index) -> (status, payload, headers)` instead (payload: a dict sent
as JSON, or a raw string; index counts requests from 0).

    with LoopbackServer() as server:
        cfg.llm.base_url = server.url
        server.fail("429", "500", "malformed")   # the next three requests fail so
"""
from __future__ import annotations

import json
import re
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Responder = Callable[[dict], str]  # request body -> reply content (a JSON string)
Handle = Callable[[dict, int], tuple[int, "dict | str", dict]]  # (body, index) -> (status, payload, headers)


class SceneResponder:
    """Deterministic, plausible replies for the pipeline's schemas (a stand-in for a real model)."""

    def __call__(self, body: dict) -> str:
        name = body["response_format"]["json_schema"]["name"]
        user = body["messages"][-1]["content"]
        texts = [p["text"] for p in user if p.get("type") == "text"] if isinstance(user, list) else [user]
        if name == "object_description":
            images = sum(1 for p in user if p.get("type") == "image_url")
            return json.dumps({"description": f"A small round object with a smooth surface, seen in "
                                              f"{images // 2} frames."})
        if name == "object_label":
            words = re.findall(r"[a-z]+", texts[0].lower())
            return json.dumps({"name": "object", "uncertain": False,
                               "attributes": [w for w in ("small", "round", "smooth") if w in words]})
        frames = [json.loads(t) for t in texts if t.startswith("{")]
        ids = sorted({o["id"] for f in frames for o in f["objects"]})
        last = len(frames) - 1
        if len(ids) < 2:
            return json.dumps({"relations": []})
        a, b = ids[0], ids[1]
        if name == "spatial_relations":
            return json.dumps({"relations": [{"subject": a, "predicate": "in front of", "object": b,
                                              "spans": [[0, last]]}]})
        return json.dumps({"relations": [
            {"subject": a, "predicate": "moving toward", "object": b, "spans": [[0, max(last - 1, 0)]],
             "category": "motion"},
            {"subject": b, "predicate": "looking at", "object": -1, "spans": [[0, 0], [last, last]],
             "category": "attentional"},
            {"subject": a, "predicate": "touching", "object": 999, "spans": [[0, 0]], "category": "event_level"}]})


class LoopbackServer:
    def __init__(self, responder: Responder | None = None, handle: Handle | None = None):
        self.responder = responder or SceneResponder()
        self.handle = handle or self._reply
        self.faults: deque[str] = deque()
        self.requests: list[dict] = []  # bodies received (kept in memory only)
        self.headers: list[dict[str, str]] = []  # their headers, lowercase names (kept in memory only)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def auth_headers(self) -> list[str]:
        return [h.get("authorization", "") for h in self.headers]

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def fail(self, *faults: str) -> None:
        """Queue faults for the next requests, in order."""
        with self._lock:
            self.faults.extend(faults)

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _reply(self, body: dict, index: int) -> tuple[int, dict, dict]:
        with self._lock:
            fault = self.faults.popleft() if self.faults else None
        if fault == "429":
            return 429, {"error": {"message": "rate limited", "type": "rate_limit_error"}}, {"retry-after": "0"}
        if fault == "500":
            return 500, {"error": {"message": "server error", "type": "server_error"}}, {}
        content, finish = self.responder(body), "stop"
        if fault == "malformed":
            content = "Sure! Here is the JSON: {" + content
        elif fault == "truncated":
            content, finish = content[: len(content) // 2], "length"
        elif fault == "schema":
            content = json.dumps({"unexpected": True})
        elif fault == "empty":
            content = ""
        prompt_tokens = len(json.dumps(body)) // 4
        return 200, {
            "id": f"chatcmpl-{index + 1}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content) // 4,
                      "total_tokens": prompt_tokens + len(content) // 4},
        }, {}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's pool expects

            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    status, payload, headers = 404, {"error": {"message": f"no route {self.path}"}}, {}
                else:
                    with server._lock:
                        index = len(server.requests)
                        server.requests.append(body)
                        server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    status, payload, headers = server.handle(body, index)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        return Handler

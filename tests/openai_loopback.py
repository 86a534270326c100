"""Scripted replies for tests that drive the real openai client against the loopback
server (data_gen/pipeline/loopback.py): `LoopbackOpenAI(respond)` is that server with
`respond(body, index) -> (status, payload, headers)` answering each request."""
from __future__ import annotations

import json

from data_gen.pipeline.loopback import LoopbackServer


def completion(content: str, finish_reason: str = "stop", prompt_tokens: int = 100,
               completion_tokens: int = 10, model: str = "loopback") -> dict:
    return {
        "id": "chatcmpl-loopback", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason, "logprobs": None,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def error(status: int, message: str) -> tuple[int, dict, dict]:
    # retry-after-ms keeps the client's backoff at 10 ms
    return status, {"error": {"message": message, "type": "server_error", "code": str(status)}}, \
        {"retry-after-ms": "10"}


def LoopbackOpenAI(respond) -> LoopbackServer:  # noqa: N802 (reads as the server it builds)
    return LoopbackServer(handle=respond)


def user_items(body: dict) -> list[dict]:
    """The judge's items, read back from its user message ("Items:\\n[...]")."""
    text = body["messages"][-1]["content"]
    return json.loads(text.split("\n", 1)[1])

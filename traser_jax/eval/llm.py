"""Calls to any OpenAI-compatible chat endpoint with a strict JSON-schema answer.

One place for what the LLM judge and the VideoQA runner share: building the
client (the key comes only from the environment and is never logged or
written), asking for a JSON answer under `response_format=json_schema`, and
counting requests and tokens. HTTP-level failures (429, 5xx, connection
errors) are retried by the `openai` client itself with backoff; answers that
arrive but are malformed are the caller's to retry, since only it knows what a
well-formed answer is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


class LLMError(RuntimeError):
    """A configuration problem or an endpoint that keeps failing."""


@dataclass
class Usage:
    """What the calls of one run cost; prices are USD per million tokens (None: unknown)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    malformed_answers: int = 0
    price_input_per_m: float | None = None
    price_output_per_m: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cost_usd(self) -> float | None:
        if self.price_input_per_m is None or self.price_output_per_m is None:
            return None
        return (self.prompt_tokens * self.price_input_per_m + self.completion_tokens * self.price_output_per_m) / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "malformed_answers": self.malformed_answers,
                "cost_usd": self.cost_usd}


def make_client(base_url: str | None = None, *, api_key_env: str = DEFAULT_KEY_ENV, timeout_s: float = 120.0,
                max_retries: int = 4):
    """An `openai.OpenAI` client for `base_url` (default: $OPENAI_BASE_URL, else OpenAI itself).

    The key is read from the environment variable `api_key_env` only. Local
    servers that ignore keys (vLLM) still need the variable set, e.g. to EMPTY."""
    from openai import OpenAI

    key = os.environ.get(api_key_env)
    if not key:
        raise LLMError(f"the API key must be in the environment variable {api_key_env} (it is unset or empty); "
                       f"for a local server that needs no key, set {api_key_env}=EMPTY")
    return OpenAI(api_key=key, base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
                  timeout=timeout_s, max_retries=max_retries)


@dataclass
class JsonAnswer:
    """One chat completion: the parsed JSON (None if it did not parse) and why it stopped."""

    value: Any
    text: str
    finish_reason: str | None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def chat_json(client, model: str, messages: list[dict], schema: dict, *, schema_name: str, usage: Usage,
              max_tokens: int | None = None, temperature: float | None = 0.0, seed: int | None = 0) -> JsonAnswer:
    """One request whose answer must follow `schema` (strict JSON schema mode).

    None leaves a sampling setting to the server (reasoning models accept no
    temperature). The length cap is sent as max_completion_tokens, which
    OpenAI's reasoning models require and vLLM accepts."""
    kwargs: dict[str, Any] = {}
    if max_tokens is not None:
        kwargs["max_completion_tokens"] = max_tokens
    if temperature is not None:
        kwargs["temperature"] = temperature
    if seed is not None:
        kwargs["seed"] = seed
    response = client.chat.completions.create(
        model=model, messages=messages,
        response_format={"type": "json_schema",
                         "json_schema": {"name": schema_name, "strict": True, "schema": schema}},
        **kwargs)
    usage.requests += 1
    if response.usage is not None:
        usage.prompt_tokens += int(response.usage.prompt_tokens or 0)
        usage.completion_tokens += int(response.usage.completion_tokens or 0)
    if not response.choices:
        return JsonAnswer(None, "", None)
    choice = response.choices[0]
    text = choice.message.content or ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    return JsonAnswer(value, text, choice.finish_reason)

"""The LLM client of stages 4-6: any OpenAI-compatible endpoint, strict JSON replies.

- The API key is read from the environment variable named by `llm.api_key_env`
  and handed to the `openai` client only: it is never logged, cached or written.
- 429, 5xx, timeouts and connection errors are retried with exponential backoff
  and jitter (honouring Retry-After); other HTTP errors fail at once.
- A reply that is not valid JSON for the request's schema (malformed, truncated
  at the token limit, failing the stage's own checks) is asked again up to
  `llm.format_retries` times; then `LLMError` is raised, which the job records as
  that video's error.
- Replies are cached by the sha256 of the request, so a rerun pays for no call
  twice; tokens and cost are counted per stage (`UsageMeter`).
- At most `llm.concurrency` requests are in flight per client (a semaphore), so
  stages may call from many threads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import jsonschema

from data_gen.pipeline.cache import ResponseCache
from data_gen.pipeline.config import LLMConfig

log = logging.getLogger(__name__)


class LLMError(RuntimeError):
    """A request that failed for good (after retries); the video gets an error record."""


class MalformedReply(ValueError):
    """A reply that does not hold what the request asked for."""


@dataclass
class Usage:
    requests: int = 0  # HTTP requests answered by the endpoint (including retried ones)
    cached: int = 0  # calls served from the response cache (no request sent)
    retries: int = 0  # requests repeated after 429/5xx/connection errors or malformed replies
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: "Usage") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


class UsageMeter:
    """Usage per stage, safe to update from many threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.stages: dict[str, Usage] = {}

    def record(self, stage: str, **counts) -> None:
        with self._lock:
            usage = self.stages.setdefault(stage, Usage())
            for k, v in counts.items():
                setattr(usage, k, getattr(usage, k) + v)

    def merge(self, stages: dict[str, dict]) -> None:
        with self._lock:
            for stage, counts in stages.items():
                self.stages.setdefault(stage, Usage()).add(Usage(**counts))

    def to_dict(self) -> dict[str, dict]:
        with self._lock:
            return {s: {**asdict(u), "cost_usd": round(u.cost_usd, 6)} for s, u in sorted(self.stages.items())}


def request_key(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def price_of(model: str, prices: dict[str, list[float]]) -> tuple[float, float]:
    """USD per million tokens (input, output); dated variants match their base name."""
    names = [m for m in prices if model == m or model.startswith(m + "-")]
    if not names:
        return 0.0, 0.0
    p = prices[max(names, key=len)]
    return float(p[0]), float(p[1])


class LLMClient:
    def __init__(self, cfg: LLMConfig, cache: ResponseCache | None = None, meter: UsageMeter | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.cache = cache
        self.meter = meter or UsageMeter()
        self._sleep = sleep
        self._slots = threading.Semaphore(max(1, cfg.concurrency))
        self._client = None
        self._client_lock = threading.Lock()

    def _openai(self):
        with self._client_lock:
            if self._client is None:
                import openai

                key = os.environ.get(self.cfg.api_key_env)
                if not key:
                    raise LLMError(f"no API key: set the environment variable {self.cfg.api_key_env} "
                                   "(llm.api_key_env names it)")
                # retries are ours (they also cover malformed replies and count in the report)
                self._client = openai.OpenAI(api_key=key, base_url=self.cfg.base_url, max_retries=0,
                                             timeout=self.cfg.timeout_s)
            return self._client

    def complete_json(self, stage: str, *, model: str, messages: list[dict], schema_name: str, schema: dict,
                      temperature: float | None = None, top_p: float | None = None, max_tokens: int | None = None,
                      check: Callable[[Any], Any] | None = None) -> Any:
        """The parsed JSON reply to a chat request constrained by `schema` (strict mode).

        `check(parsed)` may raise MalformedReply (asked again) and may return a
        normalized value, which is what this returns."""
        request: dict[str, Any] = {
            "model": model, "messages": messages,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": schema_name, "schema": schema, "strict": True}}}
        if temperature is not None:
            request["temperature"] = temperature
        if top_p is not None:
            request["top_p"] = top_p
        if max_tokens is not None:
            request["max_completion_tokens"] = max_tokens
        key = request_key(request)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                try:
                    value = self._parse(hit["content"], "stop", schema, check)
                    self.meter.record(stage, cached=1)
                    return value
                except MalformedReply:
                    pass  # a cache entry the current checks reject: ask again
        problem = ""
        for attempt in range(self.cfg.format_retries + 1):
            if attempt:
                self.meter.record(stage, retries=1)
            reply = self._send(stage, request)
            choice = reply.choices[0] if reply.choices else None
            content = choice.message.content if choice is not None and choice.message is not None else None
            try:
                value = self._parse(content, choice.finish_reason if choice is not None else None, schema, check)
            except MalformedReply as err:
                problem = str(err)
                log.warning("%s: malformed reply from %s (attempt %d of %d): %s", stage, model, attempt + 1,
                            self.cfg.format_retries + 1, problem)
                continue
            if self.cache is not None:
                self.cache.put(key, {"model": model, "content": content})
            return value
        raise LLMError(f"{stage}: no valid reply from {model} after {self.cfg.format_retries + 1} attempts: {problem}")

    @staticmethod
    def _parse(content: str | None, finish_reason: str | None, schema: dict, check) -> Any:
        if finish_reason == "length":
            raise MalformedReply("the reply was cut at the token limit (finish_reason=length)")
        if not content:
            raise MalformedReply("the reply is empty")
        try:
            parsed = json.loads(content)
        except json.JSONDecodeError as err:
            raise MalformedReply(f"the reply is not JSON ({err.msg} at char {err.pos})") from None
        try:
            jsonschema.validate(parsed, schema)
        except jsonschema.ValidationError as err:
            where = "/".join(str(p) for p in err.absolute_path) or "(root)"
            raise MalformedReply(f"the reply breaks the schema at {where}: {err.message[:200]}") from None
        return check(parsed) if check is not None else parsed

    def _send(self, stage: str, request: dict):
        import openai

        client = self._openai()
        for attempt in range(self.cfg.max_retries + 1):
            try:
                with self._slots:
                    reply = client.chat.completions.create(**request)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as err:
                status = getattr(err, "status_code", None)
                if attempt >= self.cfg.max_retries:
                    raise LLMError(f"{stage}: the endpoint failed {attempt + 1} times; last: "
                                   f"{type(err).__name__} (status {status})") from None
                wait = self._backoff(attempt, err)
                self.meter.record(stage, retries=1, requests=int(status is not None))
                log.warning("%s: %s (status %s), retrying in %.2f s", stage, type(err).__name__, status, wait)
                self._sleep(wait)
                continue
            except openai.APIStatusError as err:
                raise LLMError(f"{stage}: the endpoint refused the request: {type(err).__name__} "
                               f"(status {err.status_code})") from None
            self._account(stage, request["model"], reply)
            return reply
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, err: Exception) -> float:
        wait = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
        response = getattr(err, "response", None)
        after = response.headers.get("retry-after") if response is not None else None
        try:
            if after is not None:
                wait = max(wait, min(float(after), self.cfg.backoff_max_s))
        except ValueError:
            pass  # an HTTP date: keep our own backoff
        return wait

    def _account(self, stage: str, model: str, reply) -> None:
        usage = getattr(reply, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        pin, pout = price_of(model, self.cfg.prices)
        self.meter.record(stage, requests=1, prompt_tokens=prompt, completion_tokens=completion,
                          cost_usd=(prompt * pin + completion * pout) / 1e6)

"""The judge client: every LLM-judge call of the project goes through `JudgeClient.judge`.

One logical judge call = up to `max_attempts` requests until the answer holds a parseable
verdict (first at temperature ~0, later ones hotter); each request is itself retried on transport
faults (429, 5xx, timeouts, connection errors) with exponential backoff and jitter. Requests pass
a concurrency limit and an optional requests-per-minute limit, carry a hard timeout, and are
stored in a persistent SQLite cache keyed by (model, messages, sampling params, attempt): the same
work run again makes zero requests and yields the same verdicts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import litellm
from aiolimiter import AsyncLimiter
from pydantic import BaseModel, Field, SecretStr
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from longreward_core.records import DimensionAccounting, RunAccounting

litellm.suppress_debug_info = True
litellm.telemetry = False

EMBEDDED_JUDGE = "embedded/smollm2-135m-instruct"
JUDGE_API_KEY_ENV = "LONGREWARD_JUDGE_API_KEY"

T = TypeVar("T")


class VerdictParseError(ValueError):
    """The judge's answer holds no verdict in the required format."""


class JudgeCallFailed(RuntimeError):
    """A logical judge call gave up: no parseable verdict after every attempt, or a fatal fault.

    `transport` is True when the model could not be reached (outage, rate limit, timeouts after
    every retry): the work is unfinished rather than judged, and should be retried later.
    """

    def __init__(self, message: str, *, transport: bool = False):
        super().__init__(message)
        self.transport = transport


@dataclass(frozen=True)
class VerdictFormat(Generic[T]):
    """How a judge answer ends, and how to read it.

    `parse` reads the verdict from the answer. `prefix`/`choices`/`suffix` describe the verdict
    for judges that decode under a constraint (the embedded judge): the answer ends with
    `prefix + one of choices + suffix`, or with `prefix` followed by free list items (or the
    `none` marker) when `choices` is None.
    """

    parse: Callable[[str], T]
    prefix: str
    choices: tuple[str, ...] | None = None
    suffix: str = ""
    none: str | None = None  # list answers: the marker for "nothing to list"

    def constraint(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "choices": list(self.choices) if self.choices else None,
            "suffix": self.suffix,
            "none": self.none,
        }


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def parse_rating(text: str) -> float:
    """The last `[[N]]` in the answer, N in 0..10."""
    matches = _RATING.findall(text)
    if not matches:
        raise VerdictParseError("no '[[N]]' rating in the answer")
    value = float(matches[-1])
    if not 0 <= value <= 10:
        raise VerdictParseError(f"rating {value} outside 0-10")
    return value


RATING = VerdictFormat(parse=parse_rating, prefix="Rating: [[", choices=tuple(str(i) for i in range(11)), suffix="]]")


_BULLET = re.compile(r"^\s*(?:(?:[-*\u2022]|\d+[.)、])\s*)+")


def parse_marked_list(text: str, *, open_marker: str, none_marker: str, close_marker: str = "[[end]]") -> list[str]:
    """Bullet items between the last `open_marker` and `close_marker`, or [] after `none_marker`.

    A missing close marker is tolerated (answers cut at max_tokens keep their complete items);
    a missing open marker is not.
    """
    lower = text.lower()
    open_at = lower.rfind(open_marker.lower())
    none_at = lower.rfind(none_marker.lower())
    if open_at < 0 and none_at < 0:
        raise VerdictParseError(f"neither '{open_marker}' nor '{none_marker}' in the answer")
    if none_at > open_at:
        return []
    body = text[open_at + len(open_marker) :]
    close_at = body.lower().find(close_marker.lower())
    if close_at >= 0:
        body = body[:close_at]
    items = []
    for line in body.splitlines():
        item = _BULLET.sub("", line).strip()
        if item:
            items.append(item)
    if not items:
        raise VerdictParseError(f"'{open_marker}' is followed by no item")
    return items


class JudgeConfig(BaseModel):
    """Which judge model to call and how hard to try. Every field is a CLI option / flow parameter."""

    model: str = Field(
        EMBEDDED_JUDGE,
        description="litellm model string, e.g. 'openai/gpt-4o', 'openai/<served-name>' with "
        "api_base for vLLM / `transformers serve`, or the embedded offline default.",
    )
    api_base: str | None = Field(None, description="Base URL of an OpenAI-compatible server.")
    api_key: SecretStr | None = Field(
        None,
        description=f"API key; by default read from ${JUDGE_API_KEY_ENV} or the provider's own "
        "variable (e.g. OPENAI_API_KEY). Never logged, cached or written.",
        exclude=True,
    )
    max_attempts: int = Field(5, ge=1, description="Requests per judge call until a verdict parses.")
    temperature: float = Field(0.0, ge=0, le=2, description="Temperature of the first attempt.")
    retry_temperature: float = Field(0.95, ge=0, le=2, description="Temperature of later attempts.")
    max_tokens: int = Field(1024, ge=16, description="Completion budget per request.")
    timeout_s: float = Field(120.0, gt=0, description="Hard limit on one request, seconds.")
    transport_retries: int = Field(5, ge=0, description="Retries of a request on 429/5xx/timeouts.")
    backoff_initial_s: float = Field(1.0, ge=0, description="First backoff; doubles, with jitter.")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest backoff between retries.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute at most (None: no limit).")

    @property
    def is_embedded(self) -> bool:
        return self.model.startswith("embedded/")

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(JUDGE_API_KEY_ENV) or None


class CallCache:
    """Persistent request cache: key -> (answer text, token usage, cost). Safe across processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, text TEXT NOT NULL,"
            " prompt_tokens INTEGER, completion_tokens INTEGER, cost REAL)"
        )
        self._db.commit()

    @staticmethod
    def key(model: str, messages: list[dict[str, str]], params: dict[str, Any], attempt: int) -> str:
        blob = json.dumps(
            {"model": model, "messages": messages, "params": params, "attempt": attempt},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> tuple[str, int, int, float] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, prompt_tokens, completion_tokens, cost FROM calls WHERE key = ?", (key,)
            ).fetchone()
        return row

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?)",
                (key, text, prompt_tokens, completion_tokens, cost),
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (litellm.Timeout, litellm.APIConnectionError, litellm.RateLimitError)):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status in (408, 409, 429) or status >= 500)


class JudgeClient:
    """Async LLM calls with verdict retries, transport retries, limits, cache and accounting.

    Used for the judge, and (through `complete`) for sampling candidates from the policy.

    Create it inside the event loop that uses it (its limiters belong to that loop).
    """

    def __init__(self, config: JudgeConfig, cache: CallCache | None, accounting: RunAccounting | None = None):
        self.config = config
        self.cache = cache
        self.accounting = accounting or RunAccounting()
        self._semaphore = asyncio.Semaphore(config.concurrency)
        # Capacity 1: requests are spaced evenly (60/rpm s apart), never sent in a burst.
        self._limiter = AsyncLimiter(1, 60 / config.rpm) if config.rpm else None
        self._api_key = config.resolved_api_key()
        if config.is_embedded:
            from longreward_core.embedded import register_embedded_provider

            register_embedded_provider()

    def redact(self, message: str) -> str:
        """Remove the API key from a message that may be logged or stored."""
        if self._api_key:
            message = message.replace(self._api_key, "***")
        return message

    async def judge(self, dimension: str, messages: list[dict[str, str]], verdict: VerdictFormat[T]) -> T:
        """One logical judge call; raises JudgeCallFailed when no verdict can be had."""
        acc = self.accounting.dimension(dimension)
        cfg = self.config
        last_answer = ""
        for attempt in range(cfg.max_attempts):
            temperature = cfg.temperature if attempt == 0 else cfg.retry_temperature
            last_answer = await self.complete(
                dimension, messages, temperature, attempt, verdict.constraint() if self.config.is_embedded else None
            )
            try:
                return verdict.parse(last_answer)
            except VerdictParseError:
                acc.parse_failures += 1
        acc.failed_calls += 1
        raise JudgeCallFailed(
            f"no parseable verdict after {cfg.max_attempts} attempts (last answer ends {last_answer[-160:]!r})"
        )

    async def complete(
        self,
        dimension: str,
        messages: list[dict[str, str]],
        temperature: float,
        attempt: int,
        constraint: dict[str, Any] | None = None,
        *,
        raw_prompt: bool = False,
        **sampling: Any,
    ) -> str:
        """One cached request's answer text; `attempt` keeps repeated requests apart in the cache.

        `raw_prompt`: send the single message's content as a plain text completion (the
        server's `/completions`), with no chat template around it.

        Raises JudgeCallFailed(transport=True) when the model cannot be reached after every
        transport retry, or on a client error (4xx).
        """
        try:
            return await self._request(
                self.accounting.dimension(dimension), messages, temperature, attempt, constraint, sampling, raw_prompt
            )
        except Exception as exc:
            self.accounting.dimension(dimension).failed_calls += 1
            raise JudgeCallFailed(
                self.redact(f"judge request failed: {type(exc).__name__}: {exc}"), transport=True
            ) from None

    async def _request(
        self,
        acc: DimensionAccounting,
        messages: list[dict[str, str]],
        temperature: float,
        attempt: int,
        constraint: dict[str, Any] | None,
        sampling: dict[str, Any],
        raw_prompt: bool = False,
    ) -> str:
        cfg = self.config
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": cfg.max_tokens, **sampling}
        if constraint is not None:
            params["verdict_constraint"] = constraint
        # A raw prompt and the same text as a chat message are different requests.
        key = CallCache.key(cfg.model, messages, {**params, "endpoint": "completions"} if raw_prompt else params, attempt)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            acc.cache_hits += 1
            return hit[0]

        async def send() -> Any:
            async with self._semaphore:
                if self._limiter is not None:
                    await self._limiter.acquire()
                common = dict(
                    model=cfg.model, api_base=cfg.api_base, api_key=self._api_key, timeout=cfg.timeout_s,
                    num_retries=0, max_retries=0, **params,
                )
                call = (
                    litellm.atext_completion(prompt=messages[0]["content"], **common)
                    if raw_prompt
                    else litellm.acompletion(messages=messages, **common)
                )
                try:
                    return await asyncio.wait_for(call, timeout=cfg.timeout_s)
                except Exception:
                    acc.transport_errors += 1
                    raise

        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_exponential_jitter(
                multiplier=cfg.backoff_initial_s, max=cfg.backoff_max_s, jitter=cfg.backoff_initial_s
            ),
            stop=stop_after_attempt(cfg.transport_retries + 1),
            reraise=True,
        )
        response = await retrying(send)
        acc.calls += 1
        choice = response.choices[0]
        text = (choice.text if raw_prompt else choice.message.content) or ""
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        try:
            cost = float(litellm.completion_cost(completion_response=response) or 0.0)
        except Exception:  # litellm knows no price for this model: cost is reported as 0
            cost = 0.0
        acc.prompt_tokens += prompt_tokens
        acc.completion_tokens += completion_tokens
        acc.cost_usd += cost
        if self.cache is not None:
            self.cache.put(key, text, prompt_tokens, completion_tokens, cost)
        return text

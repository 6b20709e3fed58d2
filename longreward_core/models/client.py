"""The one LLM client: every model request of the project goes through `LLMClient.complete`.

The judge, the policy that candidates are sampled from, and the models under evaluation are all
litellm model strings reached through this client. Each request is retried on transient faults
(429, 5xx, timeouts, connection errors) with exponential backoff and jitter, passes a concurrency
limit and an optional requests-per-minute limit, carries a hard timeout, is counted under its
purpose (a judged dimension, `sampling`, `generation`, ...) and is stored in a persistent SQLite
cache keyed by (model, messages, sampling params, attempt): the same work run again makes zero
requests and gets the same answers. Verdict retries (asking again until an answer parses) belong to
judging: see `longreward_core.reward.judge`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, ClassVar

import litellm
from aiolimiter import AsyncLimiter
from pydantic import BaseModel, Field, SecretStr
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from longreward_core.models.accounting import CallAccounting, RunAccounting

litellm.suppress_debug_info = True
litellm.telemetry = False

EMBEDDED_MODEL = "embedded/smollm2-135m-instruct"
JUDGE_API_KEY_ENV = "LONGREWARD_JUDGE_API_KEY"
POLICY_API_KEY_ENV = "LONGREWARD_POLICY_API_KEY"
CALL_CACHE_FILE = "call_cache.sqlite"  # the request cache's file name, in every output folder


def resolve_api_key(configured: SecretStr | None, env_var: str | None) -> str | None:
    """A model's API key: the configured one, else `$env_var`, else None (litellm then reads the
    provider's own variable, such as OPENAI_API_KEY). The one place keys are looked up."""
    if configured is not None:
        return configured.get_secret_value()
    return (os.environ.get(env_var) if env_var else None) or None


class LLMCallFailed(RuntimeError):
    """A request or a logical call gave up.

    `transport` is True when the model could not be reached (outage, rate limit, timeouts after
    every retry): the work is unfinished rather than answered, and should be retried later.
    """

    def __init__(self, message: str, *, transport: bool = False):
        super().__init__(message)
        self.transport = transport


class LLMConfig(BaseModel):
    """Which model to call and within which limits. Every field is a CLI option / flow parameter."""

    # The environment variable read when `api_key` is empty (besides the provider's own).
    api_key_env: ClassVar[str | None] = None

    model: str = Field(
        EMBEDDED_MODEL,
        description="litellm model string, e.g. 'openai/gpt-4o', 'openai/<served-name>' with "
        "api_base for vLLM / `transformers serve`, or the embedded offline default.",
    )
    api_base: str | None = Field(None, description="Base URL of an OpenAI-compatible server.")
    api_key: SecretStr | None = Field(
        None,
        description="API key; by default read from the environment ($LONGREWARD_JUDGE_API_KEY for the judge, "
        "$LONGREWARD_POLICY_API_KEY for the policy and evaluated models) or the provider's own variable "
        "(e.g. OPENAI_API_KEY). Never logged, cached or written.",
        exclude=True,
    )
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
        return resolve_api_key(self.api_key, self.api_key_env)


class PolicyClientConfig(LLMConfig):
    """Client settings for the policy and for models under evaluation: the key defaults to
    $LONGREWARD_POLICY_API_KEY."""

    api_key_env: ClassVar[str | None] = POLICY_API_KEY_ENV


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


class LLMClient:
    """Async model requests with transport retries, limits, cache and accounting per purpose.

    Create it inside the event loop that uses it (its limiters belong to that loop).
    """

    def __init__(self, config: LLMConfig, cache: CallCache | None, accounting: RunAccounting | None = None):
        self.config = config
        self.cache = cache
        self.accounting = accounting or RunAccounting()
        self._semaphore = asyncio.Semaphore(config.concurrency)
        # Capacity 1: requests are spaced evenly (60/rpm s apart), never sent in a burst.
        self._limiter = AsyncLimiter(1, 60 / config.rpm) if config.rpm else None
        self._api_key = config.resolved_api_key()
        if config.is_embedded:
            from longreward_core.models.embedded import register_embedded_provider

            register_embedded_provider()

    def redact(self, message: str) -> str:
        """Remove the API key from a message that may be logged or stored."""
        if self._api_key:
            message = message.replace(self._api_key, "***")
        return message

    async def complete(
        self,
        purpose: str,
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

        `purpose` names what the request is for in the accounting (a dimension, `sampling`, ...).

        Raises LLMCallFailed(transport=True) when the model cannot be reached after every
        transport retry, or on a client error (4xx).
        """
        try:
            return await self._request(
                self.accounting.purpose(purpose), messages, temperature, attempt, constraint, sampling, raw_prompt
            )
        except Exception as exc:
            self.accounting.purpose(purpose).failed_calls += 1
            raise LLMCallFailed(
                self.redact(f"request to {self.config.model} failed: {type(exc).__name__}: {exc}"), transport=True
            ) from None

    async def _request(
        self,
        acc: CallAccounting,
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

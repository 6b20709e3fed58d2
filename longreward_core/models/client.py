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
import logging
import os
import re
import sqlite3
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar

from aiolimiter import AsyncLimiter
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.json_schema import SkipJsonSchema
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from longreward_core.data.form import form_order
from longreward_core.models.accounting import CallAccounting, RunAccounting
from longreward_core.models.budget import Budget
from longreward_core.models.direct import DirectRoute, direct_model
from longreward_core.models.prefix_share import PrefixShare


def litellm_module() -> Any:
    """litellm, imported on first use (about 2 s: a run whose models all take the direct route
    never pays it) and set up quietly (no debug banner, no telemetry)."""
    import litellm

    if not getattr(litellm, "_longreward_configured", False):
        litellm.suppress_debug_info = True
        litellm.telemetry = False
        litellm._longreward_configured = True
    return litellm


EMBEDDED_MODEL = "embedded/smollm2-135m-instruct"
JUDGE_API_KEY_ENV = "LONGREWARD_JUDGE_API_KEY"
POLICY_API_KEY_ENV = "LONGREWARD_POLICY_API_KEY"
CALL_CACHE_FILE = "call_cache.sqlite"  # the request cache's file name, in every output folder


def resolve_api_key(configured: SecretStr | None, env_var: str | None) -> str | None:
    """A model's API key: the configured one, else `$env_var`, else None (litellm then reads the
    provider's own variable, such as OPENAI_API_KEY). The one place keys are looked up."""
    key = configured.get_secret_value() if configured is not None else (os.environ.get(env_var) if env_var else None)
    register_secret(key)
    return key or None


class LLMCallFailed(RuntimeError):
    """A request or a logical call gave up.

    `transport` is True when the model could not be reached (outage, rate limit, timeouts after
    every retry): the work is unfinished rather than answered, and should be retried later.
    """

    def __init__(self, message: str, *, transport: bool = False):
        super().__init__(message)
        self.transport = transport


class RequestRejected(LLMCallFailed):
    """The provider refused this request for good (a 4xx other than 401/403/408/409/429: context
    length, content filter, invalid request). Asking again cannot help; the message is the
    provider's reason."""


class AuthenticationFailed(LLMCallFailed):
    """The provider refused the credentials (401/403): every later request would fail the same way,
    so the client stops sending and the run ends early."""


# Environment variables whose values are secrets wherever they appear: the providers' usual key
# variables (OPENAI_API_KEY, ANTHROPIC_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...) and ours.
_SECRET_VARIABLE = re.compile(r"(API_KEY|_TOKEN|SECRET|PASSWORD|ACCESS_KEY)", re.I)
_MIN_SECRET = 8  # shorter values would redact ordinary words
_configured_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret this process uses, so that `redact` removes it from any text."""
    if value and len(value) >= _MIN_SECRET:
        _configured_secrets.add(value)


def known_secrets() -> set[str]:
    """Every secret the process knows: configured keys and the values of key-like variables."""
    from_environment = {
        value for name, value in os.environ.items() if _SECRET_VARIABLE.search(name) and len(value) >= _MIN_SECRET
    }
    return _configured_secrets | from_environment


def redact(text: str) -> str:
    """`text` with every known secret replaced by '***' (for errors, logs, artifacts, outputs)."""
    for secret in sorted(known_secrets(), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


_plain_record_factory = logging.getLogRecordFactory()


def _redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _plain_record_factory(*args, **kwargs)
    message = record.getMessage()
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    return record


def install_log_redaction() -> None:
    """Redact known secrets from every log record of the process, whoever logs it (litellm,
    Prefect, ours): done where records are made, so no handler can see a key. Idempotent."""
    if logging.getLogRecordFactory() is not _redacted_record:
        logging.setLogRecordFactory(_redacted_record)


class LLMConfig(BaseModel):
    """Which model to call and within which limits. Every field is a CLI option / flow parameter."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    # The environment variable read when `api_key` is empty (besides the provider's own).
    api_key_env: ClassVar[str | None] = None

    model: str = Field(
        EMBEDDED_MODEL,
        description="litellm model string, e.g. `openai/gpt-4o`, `openai/<served-name>` with "
        "api_base for vLLM / `transformers serve`, or the embedded offline default.",
    )
    api_base: str | None = Field(None, description="Base URL of an OpenAI-compatible server.")
    # Not in any JSON schema: a run form must not offer a key field (flows take keys from Secret blocks).
    api_key: SkipJsonSchema[SecretStr | None] = Field(
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
        # Switching to WAL takes the file's write lock and does not wait for it: shards opening the
        # same new cache from several processes at once get "database is locked"; wait and retry.
        Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)),
            wait=wait_exponential_jitter(initial=0.05, max=1.0), stop=stop_after_delay(60), reraise=True,
        )(self._db.execute, "PRAGMA journal_mode=WAL")
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

    def put(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, cost: float) -> str:
        """Store an answer unless the key already has one (another process may have answered it
        first); returns the stored answer, so a run reports what a re-run reproduces."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO calls VALUES (?, ?, ?, ?, ?)",
                (key, text, prompt_tokens, completion_tokens, cost),
            )
            self._db.commit()
            return self._db.execute("SELECT text FROM calls WHERE key = ?", (key,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def cached_prompt_tokens(usage: Any) -> int:
    """Prompt tokens the provider served from its cache: OpenAI-style
    `prompt_tokens_details.cached_tokens`, else Anthropic's `cache_read_input_tokens`."""
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if not cached:
        cached = getattr(usage, "cache_read_input_tokens", None)
    return int(cached or 0)


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _is_transient(exc: BaseException) -> bool:
    """Faults worth retrying: timeouts, connection errors, 408, 409, 429, 5xx."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return True
    # litellm's Timeout and APIConnectionError are the OpenAI SDK's; its RateLimitError carries 429.
    # (No OpenAI SDK error exists before the SDK is imported.)
    openai = sys.modules.get("openai")
    if openai is not None and isinstance(exc, openai.APIConnectionError):
        return True
    status = _status(exc)
    return status is not None and (status in (408, 409, 429) or status >= 500)


def _is_refusal(status: int | None) -> bool:
    """A 4xx that asking again cannot change (401/403 are told apart by the caller)."""
    return status is not None and 400 <= status < 500 and status not in (408, 409, 429)


def _retry_after(exc: BaseException) -> float | None:
    """Seconds the provider asked us to wait (`Retry-After`: seconds or an HTTP date), if any."""
    headers = getattr(exc, "litellm_response_headers", None) or getattr(getattr(exc, "response", None), "headers", None)
    value = headers.get("retry-after") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _litellm_cost(response: Any) -> float:
    """A litellm response's cost in USD (0 where litellm knows no price for the model): the one
    litellm computed for its own logging when it did, else computed here."""
    hidden = getattr(response, "_hidden_params", None)
    known = hidden.get("response_cost") if isinstance(hidden, dict) else None
    if isinstance(known, (int, float)) and not isinstance(known, bool):
        return float(known)
    try:
        return float(litellm_module().completion_cost(completion_response=response) or 0.0)
    except Exception:
        return 0.0


def _backoff(config: LLMConfig) -> Callable[[Any], float]:
    """Exponential backoff with jitter, or the provider's Retry-After, capped by backoff_max_s."""
    exponential = wait_exponential_jitter(
        multiplier=config.backoff_initial_s, max=config.backoff_max_s, jitter=config.backoff_initial_s
    )

    def wait(retry_state: Any) -> float:
        asked = _retry_after(retry_state.outcome.exception())
        return min(asked, config.backoff_max_s) if asked is not None else exponential(retry_state)

    return wait


class LLMClient:
    """Async model requests with transport retries, limits, cache and accounting per purpose.

    Identical requests in flight at the same time are sent once; every waiter gets the answer.
    Create it inside the event loop that uses it (its limiters belong to that loop).

    `direct`: a plain `openai/<served-name>` model at an `api_base` is asked through the OpenAI
    SDK rather than litellm (see `models.direct`: the same requests, errors and cost at a third of
    the CPU); False sends every request through litellm.
    """

    def __init__(
        self, config: LLMConfig, cache: CallCache | None, accounting: RunAccounting | None = None,
        prefix_share: PrefixShare | None = None, budget: Budget | None = None, *, direct: bool = True,
    ):
        self.config = config
        self.cache = cache
        self.accounting = accounting or RunAccounting()
        self.prefix_share = prefix_share  # counts the cacheable share of the requests sent
        self.budget = budget  # charged with every answer used, cached or not
        self._semaphore = asyncio.Semaphore(config.concurrency)
        # Capacity 1: requests are spaced evenly (60/rpm s apart), never sent in a burst.
        self._limiter = AsyncLimiter(1, 60 / config.rpm) if config.rpm else None
        self._api_key = config.resolved_api_key()
        install_log_redaction()
        self._in_flight: dict[str, asyncio.Future[str]] = {}
        self._refused: AuthenticationFailed | None = None  # set once: no request is sent after it
        served = direct_model(config.model, config.api_base, self._api_key) if direct else None
        self._direct = (
            DirectRoute(config.model, served, config.api_base, self._api_key, config.timeout_s)
            if served is not None and config.api_base else None
        )
        if config.is_embedded:
            from longreward_core.models.embedded import register_embedded_provider

            register_embedded_provider()

    @property
    def route(self) -> str:
        """How requests are sent: 'direct' (the OpenAI SDK) or 'litellm'."""
        return "direct" if self._direct is not None else "litellm"

    def _key(
        self, messages: list[dict[str, str]], temperature: float, attempt: int, constraint: dict[str, Any] | None,
        raw_prompt: bool, sampling: dict[str, Any],
    ) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": self.config.max_tokens, **sampling}
        if constraint is not None:
            params["verdict_constraint"] = constraint
        # A raw prompt and the same text as a chat message are different requests.
        keyed = {**params, "endpoint": "completions"} if raw_prompt else params
        return CallCache.key(self.config.model, messages, keyed, attempt), params

    def cached(
        self, messages: list[dict[str, str]], temperature: float, attempt: int,
        constraint: dict[str, Any] | None = None, *, raw_prompt: bool = False, **sampling: Any,
    ) -> str | None:
        """The cached answer of a request, without sending it (None when it was never answered)."""
        if self.cache is None:
            return None
        hit = self.cache.get(self._key(messages, temperature, attempt, constraint, raw_prompt, sampling)[0])
        if hit and self.budget is not None:
            self.budget.spend((hit[1] or 0) + (hit[2] or 0), hit[3] or 0.0)
        return hit[0] if hit else None

    async def complete(
        self,
        purpose: str,
        messages: list[dict[str, str]],
        temperature: float,
        attempt: int,
        constraint: dict[str, Any] | None = None,
        *,
        raw_prompt: bool = False,
        accept: Callable[[str], bool] | None = None,
        **sampling: Any,
    ) -> str:
        """One cached request's answer text; `attempt` keeps repeated requests apart in the cache.

        `purpose` names what the request is for in the accounting (a dimension, `sampling`, ...).
        `n` > 1 in `sampling` asks for that many choices: the answer is their texts as a JSON list.
        `raw_prompt`: send the single message's content as a plain text completion (the
        server's `/completions`), with no chat template around it. `accept`: only answers it
        accepts are cached (a judge caches only answers whose verdict parses), so a re-run asks
        again for what failed.

        Raises LLMCallFailed(transport=True) when the model cannot be reached after every
        transient-fault retry, RequestRejected when the provider refuses the request (not
        retried), and AuthenticationFailed on 401/403 (after which no request is sent at all).
        """
        acc = self.accounting.purpose(purpose)
        if self._refused is not None:
            acc.failed_calls += 1
            raise self._refused
        key, params = self._key(messages, temperature, attempt, constraint, raw_prompt, sampling)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            acc.cache_hits += 1
            if self.budget is not None:
                self.budget.spend((hit[1] or 0) + (hit[2] or 0), hit[3] or 0.0)
            return hit[0]
        if (pending := self._in_flight.get(key)) is not None:
            acc.coalesced += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            text = await self._send(acc, key, messages, params, raw_prompt, accept)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            failure = self._failure(acc, exc)
            future.set_exception(failure)
            future.exception()  # retrieved here: waiters, if any, re-raise it
            raise failure from None
        else:
            future.set_result(text)
            return text
        finally:
            del self._in_flight[key]

    def _failure(self, acc: CallAccounting, exc: Exception) -> LLMCallFailed:
        """The exception a failed request becomes (its message redacted of every known secret)."""
        acc.failed_calls += 1
        if isinstance(exc, LLMCallFailed):
            return exc
        model, status = self.config.model, _status(exc)
        reason = redact(f"{type(exc).__name__}: {exc}")
        if status in (401, 403):
            self._refused = AuthenticationFailed(
                f"{model} refused the credentials (HTTP {status}): {reason}. Check the API key "
                "(LONGREWARD_JUDGE_API_KEY / LONGREWARD_POLICY_API_KEY, the provider's variable, or the Secret block)."
            )
            return self._refused
        if _is_refusal(status):
            acc.rejected += 1
            return RequestRejected(f"{model} rejected the request (HTTP {status}): {reason}")
        return LLMCallFailed(f"request to {model} failed: {reason}", transport=True)

    async def _send(
        self,
        acc: CallAccounting,
        key: str,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        raw_prompt: bool,
        accept: Callable[[str], bool] | None,
    ) -> str:
        cfg = self.config
        # The direct route takes only the OpenAI parameters (the embedded judge's constraint is not one).
        direct = self._direct if "verdict_constraint" not in params else None

        async def send() -> Any:
            async with self._semaphore:
                if self._limiter is not None:
                    await self._limiter.acquire()
                if self._refused is not None:  # refused while this request waited for its turn
                    raise self._refused
                if direct is not None:
                    call = direct.send(messages, params, raw_prompt)
                else:
                    common = dict(
                        model=cfg.model, api_base=cfg.api_base, api_key=self._api_key, timeout=cfg.timeout_s,
                        num_retries=0, max_retries=0, **params,
                    )
                    litellm = litellm_module()
                    call = (
                        litellm.atext_completion(prompt=messages[0]["content"], **common)
                        if raw_prompt
                        else litellm.acompletion(messages=messages, **common)
                    )
                try:
                    return await asyncio.wait_for(call, timeout=cfg.timeout_s)
                except Exception as exc:
                    if _is_transient(exc):
                        acc.transport_errors += 1
                    raise

        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=_backoff(cfg),
            stop=stop_after_attempt(cfg.transport_retries + 1),
            reraise=True,
        )
        response = await retrying(send)
        texts = [(choice.text if raw_prompt else choice.message.content) or "" for choice in response.choices]
        # Several choices asked for (`n`): the answer is their texts as a JSON list.
        text = json.dumps(texts, ensure_ascii=False) if params.get("n", 1) > 1 else (texts[0] if texts else "")
        cost = direct.cost(response) if direct is not None else _litellm_cost(response)
        return self.record_answer(acc, key, messages, text, getattr(response, "usage", None), cost, accept)

    def request_key(
        self, messages: list[dict[str, str]], temperature: float, attempt: int, constraint: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """A chat request's cache key and its sampling parameters, as `complete` would send them
        (for requests sent another way, such as a provider's Batch API)."""
        return self._key(messages, temperature, attempt, constraint, False, {})

    def record_answer(
        self, acc: CallAccounting, key: str, messages: list[dict[str, str]], text: str, usage: Any, cost: float,
        accept: Callable[[str], bool] | None = None,
    ) -> str:
        """Account an answer the model gave (tokens, cost, cached tokens, the budget, the cacheable
        share) and cache it if `accept` takes it; returns the stored answer. `complete` calls it for
        each answer it gets, and so does whatever obtains answers another way (a Batch API)."""
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        acc.calls += 1
        acc.prompt_tokens += prompt_tokens
        acc.completion_tokens += completion_tokens
        acc.cost_usd += cost
        acc.cached_tokens += cached_prompt_tokens(usage)
        if self.budget is not None:
            self.budget.spend(prompt_tokens + completion_tokens, cost)
        if self.prefix_share is not None:
            counted, shared = self.prefix_share.observe(self.config.model, messages)
            acc.tokenized_prompt_tokens += counted
            acc.cacheable_tokens += shared
        if self.cache is not None and (accept is None or accept(text)):
            text = self.cache.put(key, text, prompt_tokens, completion_tokens, cost)
        return text

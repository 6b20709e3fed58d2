"""The one LLM client: every model request of the project goes through `LLMClient`.

The judge, the policy that candidates are sampled from, the models under evaluation and litellm
embedding models are all litellm model strings reached through this client: completions
(`complete`), embeddings (`embed`) and a server's model listing (`served_models`). Each request is
retried on transient faults (429, 5xx, timeouts, connection errors) with exponential backoff and
jitter, passes a concurrency limit and an optional requests-per-minute limit, carries a hard
timeout, and is sent with the key `models.secrets` resolves. Answers are counted under their
purpose (a judged dimension, `sampling`, `generation`, ...) and stored in the call cache
(`models.call_cache`, any `CallStore`) keyed by (model, messages, sampling params, attempt): the
same work run again makes zero requests and gets the same answers. A failure becomes one of the
errors of `models.errors`; a configuration fault (credentials, unknown model) stops the client.
While an answer cannot be stored (the cache failing), no request is sent (`models.storage`).
Verdict retries (asking again until an answer parses) belong to judging: see
`longreward_core.reward.judge`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from aiolimiter import AsyncLimiter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr
from pydantic.json_schema import SkipJsonSchema
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from longreward_core.data.form import form_order
from longreward_core.models.accounting import CallAccounting, RunAccounting
from longreward_core.models.budget import Budget
from longreward_core.models.call_cache import CallStore, call_key
from longreward_core.models.direct import DirectRoute, direct_model, sdk_client
from longreward_core.models.errors import (
    ConfigurationError,
    LLMCallFailed,
    RequestRejected,
    classify_failure,
    is_transient,
    retry_after,
)
from longreward_core.models.prefix_share import PrefixShare
from longreward_core.models.secrets import (
    JUDGE_API_KEY_ENV,
    POLICY_API_KEY_ENV,
    install_log_redaction,
    provider_key_variable,
    resolve_api_key,
)
from longreward_core.models.storage import StorageGuard, StorageUnavailable


def litellm_module() -> Any:
    """litellm, imported on first use (its import is slow: a run whose models all take the direct
    route never pays it) and set up quietly (no debug banner, no telemetry, no retries of its own)."""
    import litellm

    if not getattr(litellm, "_longreward_configured", False):
        litellm.suppress_debug_info = True
        litellm.telemetry = False
        # Retries are the client's own; litellm's embedding path reads max_retries=0 as "the default" (2).
        litellm.DEFAULT_MAX_RETRIES = 0
        litellm._longreward_configured = True
    return litellm


EMBEDDED_MODEL = "embedded/smollm2-135m-instruct"


def check_api_base(value: str | None) -> str | None:
    """An api_base as every model config takes it: empty, or an http(s) URL with a host."""
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"api_base {value!r} is not a server URL: expected http(s)://host[:port][/path], "
            "e.g. http://127.0.0.1:8000/v1 for vLLM or transformers serve"
        )
    return value


ApiBase = Annotated[str | None, AfterValidator(check_api_base)]


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
    api_base: ApiBase = Field(None, description="Base URL of an OpenAI-compatible server.")
    # Not in any JSON schema: a run form must not offer a key field (flows take keys from Secret blocks).
    api_key: SkipJsonSchema[SecretStr | None] = Field(
        None,
        description="API key; by default read from the environment ($LONGREWARD_JUDGE_API_KEY for the judge, "
        "$LONGREWARD_POLICY_API_KEY for the policy and evaluated models) or the provider's own variable "
        "(e.g. OPENAI_API_KEY); a model at an api_base with none of these is sent the placeholder 'EMPTY' "
        "(keyless servers such as vLLM accept it). Never logged, cached or written.",
        exclude=True,
    )
    max_tokens: int = Field(1024, ge=16, description="Completion budget per request.")
    timeout_s: float = Field(120.0, gt=0, description="Hard limit on one request, seconds.")
    transport_retries: int = Field(5, ge=0, description="Retries of a request on 429/5xx/timeouts.")
    backoff_initial_s: float = Field(1.0, ge=0, description="First backoff; doubles, with jitter.")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest backoff between retries.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute at most (None: no limit).")
    storage_retry_s: float = Field(
        60.0, ge=0,
        description="When an answer cannot be stored (the call cache or the output disk failing): how long, in "
        "seconds, no request is sent while the store is retried; then the run stops, naming what failed.",
    )

    @property
    def is_embedded(self) -> bool:
        return self.model.startswith("embedded/")

    def resolved_api_key(self) -> str | None:
        return resolve_api_key(self.api_key, self.api_key_env, model=self.model, api_base=self.api_base)


class PolicyClientConfig(LLMConfig):
    """Client settings for the policy and for models under evaluation: the key defaults to
    $LONGREWARD_POLICY_API_KEY."""

    api_key_env: ClassVar[str | None] = POLICY_API_KEY_ENV


def cached_prompt_tokens(usage: Any) -> int:
    """Prompt tokens the provider served from its cache: OpenAI-style
    `prompt_tokens_details.cached_tokens`, else Anthropic's `cache_read_input_tokens`."""
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if not cached:
        cached = getattr(usage, "cache_read_input_tokens", None)
    return int(cached or 0)


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
        asked = retry_after(retry_state.outcome.exception())
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
        self, config: LLMConfig, cache: CallStore | None, accounting: RunAccounting | None = None,
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
        self._refused: ConfigurationError | None = None  # set once: no request is sent after it
        # Closed while an answer cannot be stored: nothing more is paid for until it is.
        self.storage = StorageGuard(config.storage_retry_s, reuse=(
            f"every answer stored in the call cache {cache.label}" if cache is not None else "nothing: no call cache"
        ))
        served = direct_model(config.model, config.api_base, self._api_key) if direct else None
        self._direct = (
            DirectRoute(config.model, served, config.api_base, self._api_key, config.timeout_s)
            if served is not None and config.api_base else None
        )
        if config.is_embedded:
            from longreward_core.models.embedded_llm import register_embedded_provider

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
        return call_key(self.config.model, messages, keyed, attempt), params

    async def cached(
        self, messages: list[dict[str, str]], temperature: float, attempt: int,
        constraint: dict[str, Any] | None = None, *, raw_prompt: bool = False, **sampling: Any,
    ) -> str | None:
        """The cached answer of a request, without sending it (None when it was never answered)."""
        if self.cache is None:
            return None
        return self._hit_answer(await self._lookup(self._key(messages, temperature, attempt, constraint, raw_prompt, sampling)[0]))

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
        retried), and ConfigurationError (AuthenticationFailed for credentials) when no request
        can succeed: refused or missing credentials, an unknown model or provider; after it no
        request is sent at all.
        """
        cfg = self.config
        key, params = self._key(messages, temperature, attempt, constraint, raw_prompt, sampling)
        # The direct route takes only the OpenAI parameters (the embedded judge's constraint is not one).
        direct = self._direct if "verdict_constraint" not in params else None

        def call() -> Awaitable[Any]:
            if direct is not None:
                return direct.send(messages, params, raw_prompt)
            common = dict(
                model=cfg.model, api_base=cfg.api_base, api_key=self._api_key, timeout=cfg.timeout_s,
                num_retries=0, max_retries=0, **params,
            )
            litellm = litellm_module()
            if raw_prompt:
                return litellm.atext_completion(prompt=messages[0]["content"], **common)
            return litellm.acompletion(messages=messages, **common)

        def read(response: Any) -> tuple[str, Any, float]:
            texts = [(choice.text if raw_prompt else choice.message.content) or "" for choice in response.choices]
            # Several choices asked for (`n`): the answer is their texts as a JSON list.
            text = json.dumps(texts, ensure_ascii=False) if params.get("n", 1) > 1 else (texts[0] if texts else "")
            usage = getattr(response, "usage", None)
            return text, usage, direct.cost(response) if direct is not None else _litellm_cost(response)

        return await self._request(purpose, key, call, read, accept, messages)

    async def embed(self, purpose: str, texts: list[str]) -> list[list[float]]:
        """Embedding vectors of `texts` from the model (litellm's embedding endpoint), one request,
        with the retries, limits, timeout, key, cache and accounting of a completion. Raises as
        `complete` does."""
        cfg = self.config
        key = call_key(cfg.model, [], {"endpoint": "embeddings", "input": texts}, 0)

        def call() -> Awaitable[Any]:
            return litellm_module().aembedding(
                model=cfg.model, input=texts, api_base=cfg.api_base, api_key=self._api_key, timeout=cfg.timeout_s,
                num_retries=0, max_retries=0,
            )

        def read(response: Any) -> tuple[str, Any, float]:
            vectors = [item["embedding"] for item in response.data]
            return json.dumps(vectors), getattr(response, "usage", None), _litellm_cost(response)

        return json.loads(await self._request(purpose, key, call, read, None, None))

    async def served_models(self) -> list[dict[str, Any]]:
        """The entries of the server's `GET /models` listing (an OpenAI-compatible server at
        api_base; vLLM adds each model's `max_model_len`), asked with the client's key, timeout
        and retries. Not cached: a server may be restarted with other models."""
        if not self.config.api_base:
            raise ValueError(f"{self.config.model} has no api_base: no server to list models")
        variable = provider_key_variable(self.config.model)
        key = self._api_key or (os.environ.get(variable) if variable else None) or ""

        async def call() -> Any:
            client = await sdk_client(self.config.api_base, key)
            return await client.get("/models", cast_to=object, options={"timeout": self.config.timeout_s})

        try:
            listed = await self._send(None, call)
        except Exception as exc:
            raise self._classify(exc) from None
        entries = listed.get("data") if isinstance(listed, dict) else None
        return [entry for entry in entries or [] if isinstance(entry, dict)]

    async def _request(
        self,
        purpose: str,
        key: str,
        call: Callable[[], Awaitable[Any]],
        read: Callable[[Any], tuple[str, Any, float]],
        accept: Callable[[str], bool] | None,
        messages: list[dict[str, str]] | None,
    ) -> str:
        """A request's answer text: from the cache, from an identical request in flight, or sent
        (`call`) and read (`read`: text, usage, cost), accounted and cached."""
        acc = self.accounting.purpose(purpose)
        if self._refused is not None:
            acc.failed_calls += 1
            raise self._refused
        if self.cache is not None and (hit := await self._lookup(key)) is not None:
            acc.cache_hits += 1
            return self._hit_answer(hit)
        if (pending := self._in_flight.get(key)) is not None:
            acc.coalesced += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            text, usage, cost = read(await self._send(acc, call))
            tokens = self._record(acc, usage, cost, messages)
            if self.cache is not None and (accept is None or accept(text)):
                text = await self._store(key, text, *tokens, cost)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except StorageUnavailable as exc:  # the storage's fault, not the model's: the run stops
            future.set_exception(exc)
            future.exception()
            raise
        except Exception as exc:
            acc.failed_calls += 1
            failure = self._classify(exc)
            if isinstance(failure, RequestRejected):
                acc.rejected += 1
            future.set_exception(failure)
            future.exception()  # retrieved here: waiters, if any, re-raise it
            raise failure from None
        else:
            future.set_result(text)
            return text
        finally:
            del self._in_flight[key]

    def _classify(self, exc: Exception) -> LLMCallFailed:
        """The exception a failed request becomes (its message redacted of every known secret); a
        configuration fault stops every later request."""
        failure = classify_failure(
            exc, model=self.config.model, api_base=self.config.api_base, api_key=self._api_key,
            key_variables=" / ".join(f"${v}" for v in (JUDGE_API_KEY_ENV, POLICY_API_KEY_ENV)),
        )
        if isinstance(failure, ConfigurationError) and self._refused is None:
            self._refused = failure
        return failure

    async def _send(self, acc: CallAccounting | None, call: Callable[[], Awaitable[Any]]) -> Any:
        """`call()`'s response, within the limits and the timeout, retried on transient faults."""
        cfg = self.config

        async def send() -> Any:
            async with self._semaphore:
                if self._limiter is not None:
                    await self._limiter.acquire()
                await self.storage.wait_open()  # nothing is paid for while answers cannot be stored
                if self._refused is not None:  # refused while this request waited for its turn
                    raise self._refused
                try:
                    return await asyncio.wait_for(call(), timeout=cfg.timeout_s)
                except Exception as exc:
                    if acc is not None and is_transient(exc):
                        acc.transport_errors += 1
                    raise

        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=_backoff(cfg),
            stop=stop_after_attempt(cfg.transport_retries + 1),
            reraise=True,
        )
        return await retrying(send)

    def _record(
        self, acc: CallAccounting, usage: Any, cost: float, messages: list[dict[str, str]] | None,
    ) -> tuple[int, int]:
        """Account an answered request; returns its (prompt, completion) tokens."""
        acc.calls += 1
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        acc.prompt_tokens += prompt_tokens
        acc.completion_tokens += completion_tokens
        acc.cost_usd += cost
        acc.cached_tokens += cached_prompt_tokens(usage)
        if self.budget is not None:
            self.budget.spend(prompt_tokens + completion_tokens, cost)
        if self.prefix_share is not None and messages is not None:
            counted, shared = self.prefix_share.observe(self.config.model, messages)
            acc.tokenized_prompt_tokens += counted
            acc.cacheable_tokens += shared
        return prompt_tokens, completion_tokens

    # The cache's reads and writes, through the storage guard: a cache that fails closes the gate
    # of every request until it answers again (or the run stops).
    async def _lookup(self, key: str) -> tuple[str, int, int, float] | None:
        assert self.cache is not None
        return await self.storage.use(f"the call cache {self.cache.label}", lambda: self.cache.get(key))

    async def _store(self, key: str, text: str, prompt_tokens: int, completion_tokens: int, cost: float) -> str:
        """Store a paid answer; returns the stored one, the answer a re-run reproduces."""
        assert self.cache is not None
        return await self.storage.use(
            f"the call cache {self.cache.label}",
            lambda: self.cache.put(key, text, prompt_tokens, completion_tokens, cost, model=self.config.model),
        )

    # Requests sent another way, such as a provider's Batch API, by an executor that runs in a worker
    # thread: the cache is read and written directly (a batch's answers stay with the provider, and
    # the batch ledger finds them again, so a failing cache loses nothing there).
    def request_key(
        self, messages: list[dict[str, str]], temperature: float, attempt: int, constraint: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """A chat request's cache key and its sampling parameters, as `complete` would send them."""
        return self._key(messages, temperature, attempt, constraint, False, {})

    def cached_in_thread(
        self, messages: list[dict[str, str]], temperature: float, attempt: int, constraint: dict[str, Any] | None = None,
    ) -> str | None:
        """`cached`, for an executor that runs in a worker thread."""
        if self.cache is None:
            return None
        return self._hit_answer(self.cache.get(self.request_key(messages, temperature, attempt, constraint)[0]))

    def _hit_answer(self, hit: tuple[str, int, int, float] | None) -> str | None:
        """A cached answer's text; its tokens and cost are charged to the budget, which counts every
        answer used, cached or not."""
        if hit is None:
            return None
        if self.budget is not None:
            self.budget.spend((hit[1] or 0) + (hit[2] or 0), hit[3] or 0.0)
        return hit[0]

    def record_answer(
        self, acc: CallAccounting, key: str, messages: list[dict[str, str]], text: str, usage: Any, cost: float,
        accept: Callable[[str], bool] | None = None,
    ) -> str:
        """Account and cache (if `accept`ed) an answer obtained another way, as `complete` does its
        own; returns the stored answer."""
        prompt_tokens, completion_tokens = self._record(acc, usage, cost, messages)
        if self.cache is not None and (accept is None or accept(text)):
            text = self.cache.put(key, text, prompt_tokens, completion_tokens, cost, model=self.config.model)
        return text

"""The errors of a model request, and how a provider's exception is classified into one of them.

- `LLMCallFailed(transport=True)`: the model could not be reached (outage, rate limit, timeouts
  after every retry): unfinished work that a later run retries.
- `RequestRejected`: the provider refused this one request (context length, content filter): final
  for that request, the run goes on.
- `ConfigurationError`: no retry or re-run can help (refused or missing credentials, a model the
  server or litellm does not know): the client sends nothing more and the run stops with the fix.
  `AuthenticationFailed` is the credentials' case.

Callers import these without importing the client.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from longreward_core.models.secrets import KEYLESS_API_KEY, redact


class LLMCallFailed(RuntimeError):
    """A request or a logical call gave up.

    `transport` is True when the model could not be reached (outage, rate limit, timeouts after
    every retry): the work is unfinished rather than answered, and should be retried later.
    """

    def __init__(self, message: str, *, transport: bool = False):
        super().__init__(message)
        self.transport = transport


class RequestRejected(LLMCallFailed):
    """The provider refused this request for good (a 4xx other than 401/403/404/408/409/429:
    context length, content filter, invalid request). Asking again cannot help; the message is the
    provider's reason."""


class ConfigurationError(LLMCallFailed):
    """The configuration is wrong (credentials, model name, server address, provider): every later
    request would fail the same way, so the client stops sending and the run ends early with the fix."""


class AuthenticationFailed(ConfigurationError):
    """The provider refused the credentials (401/403), or no key was there to send."""


# What the OpenAI SDK says (litellm passes it on as a 500) when it has no key to send.
_MISSING_KEY = ("missing credentials", "api_key client option must be set")
# litellm's refusal of a model string whose provider it cannot tell.
_UNKNOWN_PROVIDER = "llm provider not provided"


def status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _says(exc: BaseException, phrases: tuple[str, ...] | str) -> bool:
    text = str(exc).lower()
    return any(p in text for p in ((phrases,) if isinstance(phrases, str) else phrases))


def is_configuration_fault(exc: BaseException) -> bool:
    """A fault of the configuration, whatever status it came with: never worth a retry."""
    return isinstance(exc, ConfigurationError) or status_of(exc) in (401, 403, 404) or _says(
        exc, (*_MISSING_KEY, _UNKNOWN_PROVIDER)
    )


def is_transient(exc: BaseException) -> bool:
    """Faults worth retrying: timeouts, connection errors, 408, 409, 429, 5xx (but never a missing key
    that litellm reports as a 500)."""
    if is_configuration_fault(exc):
        return False
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return True
    # litellm's Timeout and APIConnectionError are the OpenAI SDK's; its RateLimitError carries 429.
    # (No OpenAI SDK error exists before the SDK is imported.)
    openai = sys.modules.get("openai")
    if openai is not None and isinstance(exc, openai.APIConnectionError):
        return True
    status = status_of(exc)
    return status is not None and (status in (408, 409, 429) or status >= 500)


def is_refusal(status: int | None) -> bool:
    """A 4xx that asking again cannot change (401/403/404 are configuration faults)."""
    return status is not None and 400 <= status < 500 and status not in (408, 409, 429)


def retry_after(exc: BaseException) -> float | None:
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


def classify_failure(
    exc: Exception, *, model: str, api_base: str | None, api_key: str | None, key_variables: str
) -> LLMCallFailed:
    """The error a failed request becomes, its message redacted of every known secret and, for a
    configuration fault, naming the fix. `key_variables` names where the model's key is read from;
    `api_key` is the key that was sent (to tell the keyless placeholder apart)."""
    if isinstance(exc, LLMCallFailed):
        return exc
    status = status_of(exc)
    reason = redact(f"{type(exc).__name__}: {exc}")
    where = f" at {api_base}" if api_base else ""
    if status in (401, 403) or _says(exc, _MISSING_KEY):
        if status in (401, 403):
            sent = (
                f"; no key was configured, so the placeholder '{KEYLESS_API_KEY}' was sent" if api_key == KEYLESS_API_KEY else ""
            )
            return AuthenticationFailed(
                f"{model} refused the credentials (HTTP {status}): {reason}{sent}. Check the API key "
                f"({key_variables}, the provider's variable, or the Secret block)."
            )
        return AuthenticationFailed(
            f"{model}: no API key to send ({reason}). Set {key_variables} or the provider's variable "
            "(or name a Secret block), or give --api-base for a keyless OpenAI-compatible server."
        )
    if status == 404:
        return ConfigurationError(
            f"{model}{where}: the server knows no such model or endpoint (HTTP 404): {reason}. Check the model "
            "name (for an OpenAI-compatible server: openai/<id> with an id its GET /models lists) and that the "
            "api_base ends where the API starts (usually /v1)."
        )
    if _says(exc, _UNKNOWN_PROVIDER):
        return ConfigurationError(
            f"{model}: litellm cannot tell which provider serves this model: {reason}. Name the model as "
            "<provider>/<model> (e.g. openai/<served id> with an api_base for vLLM or transformers serve)."
        )
    if is_refusal(status):
        return RequestRejected(f"{model} rejected the request (HTTP {status}): {reason}")
    return LLMCallFailed(f"request to {model} failed: {reason}", transport=True)

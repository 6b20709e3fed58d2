"""API keys and the secrets that must never be shown: where a model's key is looked up, and the
redaction that removes every known secret from errors, logs and artifacts.

A model at an `api_base` with no key anywhere (no configured key, no LONGREWARD_*_API_KEY, no
provider variable such as OPENAI_API_KEY) is a keyless OpenAI-compatible server (vLLM,
`transformers serve`): it is sent `KEYLESS_API_KEY`, the placeholder vLLM's documentation uses,
because the OpenAI SDK refuses to send a request without some key. A server that does want a key
then answers 401, which the client reports as refused credentials.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

from pydantic import SecretStr

JUDGE_API_KEY_ENV = "LONGREWARD_JUDGE_API_KEY"
POLICY_API_KEY_ENV = "LONGREWARD_POLICY_API_KEY"
KEYLESS_API_KEY = "EMPTY"

logger = logging.getLogger(__name__)

# Environment variables whose values are secrets wherever they appear: the providers' usual key
# variables (OPENAI_API_KEY, ANTHROPIC_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...) and ours.
_SECRET_VARIABLE = re.compile(r"(API_KEY|_TOKEN|SECRET|PASSWORD|ACCESS_KEY)", re.I)
_MIN_SECRET = 8  # shorter values would redact ordinary words
_configured_secrets: set[str] = set()
_told_keyless: set[tuple[str, str]] = set()
_told_lock = threading.Lock()


def provider_key_variable(model: str) -> str | None:
    """The variable litellm reads a provider's key from (`openai/...` -> OPENAI_API_KEY)."""
    provider, slash, _ = model.partition("/")
    return f"{provider.upper()}_API_KEY" if slash and provider else None


def resolve_api_key(
    configured: SecretStr | None, env_var: str | None, *, model: str = "", api_base: str | None = None
) -> str | None:
    """A model's API key: the configured one, else `$env_var`; else, for a model at `api_base`
    whose provider variable is unset, `KEYLESS_API_KEY` (said once per model in the log); else
    None (litellm then reads the provider's own variable). The one place keys are looked up."""
    key = configured.get_secret_value() if configured is not None else (os.environ.get(env_var) if env_var else None)
    register_secret(key)
    if key:
        return key
    provider_variable = provider_key_variable(model)
    if api_base and not (provider_variable and os.environ.get(provider_variable)):
        with _told_lock:
            first = (model, api_base) not in _told_keyless
            _told_keyless.add((model, api_base))
        if first:
            wanted = " or ".join(f"${v}" for v in (env_var, provider_variable) if v)
            logger.info(
                "no API key for %s at %s: sending the placeholder key %r, as keyless OpenAI-compatible servers "
                "(vLLM, transformers serve) accept; set %s if the server needs a key",
                model, api_base, KEYLESS_API_KEY, wanted or "a key",
            )
        return KEYLESS_API_KEY
    return None


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

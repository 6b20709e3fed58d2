"""Cache keys for the stage tasks: (stage, stage version, content hash of the inputs, config).

Not the flow run id (a new run or a retry reuses finished shards) and not the source text of the
task (an edit that does not change the stage version keeps the cache). Bump a stage's VERSION
when its output for the same inputs changes. Secrets never enter a key: configs are dumped with
their secret fields excluded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from longreward_core.data.io import InputError, file_hash
from longreward_core.models.call_cache import is_database_url, with_password
from longreward_core.models.errors import ConfigurationError

# Retries of a stage task: 10 s, 20 s, 40 s ... each with up to 50% jitter.
RETRY_DELAYS = exponential_backoff(backoff_factor=10)
RETRY_JITTER = 0.5
CACHE_EXPIRATION = timedelta(days=30)


class ShardIncomplete(RuntimeError):
    """A model could not be reached for some of the shard's work: the stage fails, so it is retried
    and never cached half-done; the requests that were answered are in the call cache."""


class ServerSetupMissing(RuntimeError):
    """The Prefect server lacks something the run asks for (a global concurrency limit): every
    retry would fail alike until someone creates it."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    return value


def stage_cache_key(
    stage: str, version: int, inputs: Callable[[dict[str, Any]], list[Path]], config: tuple[str, ...] = ()
) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A cache_key_fn hashing the named input files' contents and the named config parameters."""

    def key(_: TaskRunContext, params: dict[str, Any]) -> str:
        digest = hashlib.sha256(f"{stage}:{version}".encode())
        for path in inputs(params):
            digest.update(file_hash(path).encode() if Path(path).exists() else f"missing:{path}".encode())
        for name in config:
            digest.update(json.dumps(_jsonable(params.get(name)), sort_keys=True, default=str).encode())
        return f"{stage}-v{version}-{digest.hexdigest()[:40]}"

    return key


# Failures every retry repeats until someone fixes the configuration, the input or the server's setup.
NOT_FIXED_BY_RETRY = (ConfigurationError, InputError, ServerSetupMissing)


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """A task's retry_condition_fn: refused credentials, bad input and a missing server setup fail
    every retry alike, so the task (and the run) ends at once; any other failure goes to the retry
    policy."""
    return not isinstance(state.data, NOT_FIXED_BY_RETRY)


def configuration_fault(state: Any) -> bool:
    """Whether a finished task run failed on what a re-run cannot fix (credentials, an unknown
    model, bad input, a missing server setup), so the run's message must not advise one."""
    return state.is_failed() and isinstance(state.result(raise_on_failure=False), NOT_FIXED_BY_RETRY)


def shard_stage(stage: str, version: int, inputs: Callable[[dict[str, Any]], list[Path]], config: tuple[str, ...]):
    """The decorator of a per-shard stage task: run name '<stage>-shard-NNNN', retries with
    exponential backoff and jitter, and a persisted result cached by stage_cache_key."""
    return task(
        name=f"{stage}-shard",
        task_run_name=f"{stage}-{{shard_name}}",
        retries=2,
        retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=worth_retrying,
        retry_jitter_factor=RETRY_JITTER,
        cache_key_fn=stage_cache_key(stage, version, inputs, config),
        cache_expiration=CACHE_EXPIRATION,
        persist_result=True,
    )


def with_secret_key(config: Any, secret_block: str | None) -> Any:
    """`config` with its api_key read from a Prefect Secret block (when one is named).

    The key is resolved inside the task, so it never travels as a parameter, never enters a
    cache key (api_key is excluded from config dumps) and is never logged.
    """
    if not secret_block:
        return config
    from prefect.blocks.system import Secret
    from pydantic import SecretStr

    return config.model_copy(update={"api_key": SecretStr(Secret.load(secret_block).get())})


def with_cache_password(cache_path: str, secret_block: str | None) -> str:
    """The call cache's location with the database password from a Prefect Secret block (when one
    is named), resolved inside the task like the keys: the URL that carries it is never a
    parameter, and the password is registered for redaction from every log record."""
    if not secret_block or not is_database_url(cache_path):
        return cache_path
    from prefect.blocks.system import Secret

    return with_password(cache_path, Secret.load(secret_block).get())

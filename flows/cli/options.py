"""What every command shares: options read from config fields, option groups, the console and
the error exits.

An option's default, help text and bounds come from the pydantic field it fills (`option`), so
each is stated once, in the config. Options that together fill one config (the judge's, the
evaluated model's) are an `OptionGroup`, declared once here: a command of `grouped_options`
takes the group as a parameter's default (`judge: JudgeConfig = JUDGE`) and receives the config,
built from the group's options.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from flows.params import BuildParams
from longreward_core.data.io import InputError
from longreward_core.evaluation.predict import ModelSpec
from longreward_core.models.errors import ConfigurationError
from longreward_core.models.storage import StorageUnavailable
from longreward_core.pipeline.sampling import PolicyConfig
from longreward_core.reward.judge import JudgeConfig
from longreward_core.reward.scorer import ScoringConfig

# soft_wrap: messages are never hard-wrapped at the terminal's width (logs and pipes read them whole).
console = Console(soft_wrap=True)

_UNSET: Any = object()


def option(model: type[BaseModel], field: str, *flags: str, default: Any = _UNSET, help: str | None = None) -> Any:
    """A typer option for `model.field`: its default, help text and bounds come from the field.

    `default` overrides the field's default for one command (e.g. a benchmark's input budget).
    """
    info = model.model_fields[field]
    if default is _UNSET:
        default = ... if info.is_required() else info.get_default(call_default_factory=True)
    bounds = {}
    for constraint in info.metadata:  # ge / le map to typer's min / max; pydantic checks gt / lt
        if getattr(constraint, "ge", None) is not None:
            bounds["min"] = constraint.ge
        if getattr(constraint, "le", None) is not None:
            bounds["max"] = constraint.le
    return typer.Option(default, *flags, help=help or info.description, show_default=default is not None, **bounds)


def fail(message: str, code: int) -> NoReturn:
    """End the command: the message in red, then exit `code`."""
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


@contextmanager
def input_errors() -> Iterator[None]:
    """Bad input (a missing file, a refused value) or configuration (credentials, an unknown model) ends
    the command with its message, which names the fix, and exit code 2. Storage that stayed down
    mid-run (the call cache, the output disk) ends it with exit code 1 and what a re-run reuses."""
    try:
        yield
    except (InputError, ValidationError, ValueError, FileNotFoundError, ConfigurationError) as exc:
        fail(str(exc), 2)
    except StorageUnavailable as exc:
        fail(str(exc), 1)


def fmt(value: float | None) -> str:
    """A figure with two decimals, '-' when there is none."""
    return "-" if value is None else f"{value:.2f}"


_CACHE_URL_HELP = (
    "PostgreSQL URL of a call cache several hosts share (postgresql://user@host:5432/db; the password comes from "
    "PGPASSWORD or ~/.pgpass, never the URL). Default: call_cache.sqlite in the output folder."
)


def cache_url_option() -> Any:
    """`--cache-url`, the call cache's location, as every command that makes model requests takes it."""
    return option(BuildParams, "cache_url", "--cache-url", help=_CACHE_URL_HELP)


@dataclass(frozen=True)
class OptionGroup:
    """The options that fill one config: one per field in `fields`, its flag `--<field>` unless
    `flags` names another, its type, default, help and bounds from the field (`defaults`
    overrides a default for the commands that take this group)."""

    config: type[BaseModel]
    fields: tuple[str, ...]
    flags: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)

    def only(self, *fields: str) -> OptionGroup:
        """The same group restricted to `fields` (a command that sets only some of the config)."""
        return replace(self, fields=fields)

    def with_defaults(self, **defaults: Any) -> OptionGroup:
        """The same group with other defaults for some fields."""
        return replace(self, defaults={**self.defaults, **defaults})

    def parameters(self, prefix: str) -> list[inspect.Parameter]:
        """The group's options as keyword parameters `<prefix>_<field>` of a command."""
        return [
            inspect.Parameter(
                f"{prefix}_{name}", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                annotation=self.config.model_fields[name].annotation,
                default=option(self.config, name, self.flags.get(name, "--" + name.replace("_", "-")),
                               default=self.defaults.get(name, _UNSET)),
            )
            for name in self.fields
        ]

    def build(self, prefix: str, values: dict[str, Any]) -> BaseModel:
        """The config from the group's parsed options, taken out of `values`."""
        return self.config(**{name: values.pop(f"{prefix}_{name}") for name in self.fields})


JUDGE = OptionGroup(
    JudgeConfig, ("model", "api_base", "concurrency", "rpm", "timeout_s", "max_tokens", "max_attempts", "storage_retry_s"),
    flags={"model": "--judge-model", "api_base": "--judge-api-base", "concurrency": "--judge-concurrency",
           "rpm": "--judge-rpm", "timeout_s": "--judge-timeout", "max_tokens": "--judge-max-tokens",
           "max_attempts": "--judge-max-attempts", "storage_retry_s": "--storage-retry"},
)
"""The judge: which model, where, how many requests at once and per minute, how long one may take,
how long an answer may be, how many requests a verdict may take, and how long its answers wait in
memory for storage that fails."""

BATCH_JUDGE = replace(
    JUDGE, fields=(*JUDGE.fields, "batch", "batch_poll_s"),
    flags={**JUDGE.flags, "batch": "--batch/--no-batch", "batch_poll_s": "--batch-poll-s"},
)
"""The judge of a scoring run, which may be asked through its provider's Batch API."""

MODEL = OptionGroup(
    ModelSpec, ("model", "name", "backend", "api_base", "tokenizer", "max_input_tokens", "concurrency", "timeout_s"),
    flags={"api_base": "--model-api-base", "concurrency": "--model-concurrency", "timeout_s": "--model-timeout"},
)
"""The model under evaluation."""

POLICY = OptionGroup(
    PolicyConfig,
    ("model", "api_base", "candidates_per_prompt", "max_new_tokens", "temperature", "top_p", "timeout_s",
     "max_context_tokens", "allow_truncation", "sample_in_one_request"),
    flags={"model": "--policy-model", "api_base": "--policy-api-base", "timeout_s": "--policy-timeout",
           "max_context_tokens": "--policy-max-context-tokens", "allow_truncation": "--policy-allow-truncation",
           "sample_in_one_request": "--policy-sample-in-one-request"},
)
"""The policy that samples candidates."""

SCORING = OptionGroup(
    ScoringConfig,
    ("embedding_model", "qdrant_url", "retrieval_chunk_tokens", "completeness_chunk_tokens", "prune",
     "max_judge_cost_usd", "max_judge_tokens"),
    flags={"prune": "--prune/--no-prune"},
)
"""How candidates are scored: retrieval, chunking, pair pruning and the judge budget."""

Command = TypeVar("Command", bound=Callable[..., Any])


def grouped_options(command: Command) -> Command:
    """A command decorator: each parameter whose default is an `OptionGroup` becomes the group's
    options on the command line (in that parameter's place), and the command receives the config
    they fill. A value the config refuses ends the command with exit code 2."""
    signature = inspect.signature(command, eval_str=True)
    groups = {p.name: p.default for p in signature.parameters.values() if isinstance(p.default, OptionGroup)}
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        group = groups.get(parameter.name)
        parameters += group.parameters(parameter.name) if group else [parameter]

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        with input_errors():
            for name, group in groups.items():
                values[name] = group.build(name, values)
        return command(**values)

    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters}  # typer resolves types from these
    return run  # type: ignore[return-value]


"""Judging: one logical judge call asks until the answer holds a parseable verdict.

A judge call is up to `max_attempts` requests through the LLM client (first at temperature ~0,
later ones hotter), each answer read by the verdict format the prompt asks for. The embedded judge
decodes its verdict under the format's constraint, so its answers always parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import Field, model_validator

from longreward_core.models.accounting import RunAccounting
from longreward_core.models.batch import batch_provider
from longreward_core.models.budget import Budget
from longreward_core.models.call_cache import CallStore
from longreward_core.models.client import LLMClient, LLMConfig
from longreward_core.models.errors import LLMCallFailed
from longreward_core.models.prefix_share import PrefixShare
from longreward_core.models.secrets import JUDGE_API_KEY_ENV
from longreward_core.reward.prompts import with_cache_breakpoint
from longreward_core.reward.verdicts import VerdictFormat, VerdictParseError

T = TypeVar("T")


@dataclass(frozen=True)
class JudgeRequest:
    """One request of a judge call, as the LLM client sends and caches it."""

    messages: list[dict[str, Any]]
    temperature: float
    attempt: int
    constraint: dict[str, Any] | None


class JudgeCallFailed(LLMCallFailed):
    """A judge call gave up: no parseable verdict after every attempt."""


class JudgeConfig(LLMConfig):
    """The judge model, its limits, and how hard to try for a verdict. Every field is a CLI option /
    flow parameter."""

    api_key_env: ClassVar[str | None] = JUDGE_API_KEY_ENV

    max_attempts: int = Field(5, ge=1, description="Requests per judge call until a verdict parses.")
    temperature: float = Field(0.0, ge=0, le=2, description="Temperature of the first attempt.")
    retry_temperature: float = Field(0.95, ge=0, le=2, description="Temperature of later attempts.")
    batch: bool = Field(
        False,
        description="Ask the judge through its provider's Batch API (about half the price, answers within hours): "
        "the scoring plan runs in waves of batches, recorded in the output folder so a re-run resumes them.",
    )
    batch_poll_s: float = Field(60.0, gt=0, description="With batch: seconds between polls of a wave's batches.")
    batch_max_lines: int = Field(50_000, ge=1, description="With batch: lines per batch file at most (the provider's limit).")
    batch_max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="With batch: bytes per batch file at most (the provider's limit).")
    cache_control: bool = Field(
        False,
        description="Mark the end of each prompt's shared instructions as an Anthropic cache_control breakpoint "
        "(for Anthropic models; other providers cache prefixes without it).",
    )

    @model_validator(mode="after")
    def _batchable(self) -> JudgeConfig:
        """Batch mode needs a judge whose provider litellm batches for: refused here, before anything starts."""
        if self.batch:
            batch_provider(self)
        return self


class Judge:
    """Asks the judge model for verdicts; requests go through an `LLMClient` (cache, retries,
    limits, accounting per dimension). Create it inside the event loop that uses it."""

    def __init__(
        self, config: JudgeConfig, cache: CallStore | None, accounting: RunAccounting | None = None,
        prefix_share: PrefixShare | None = None, budget: Budget | None = None,
    ):
        self.config = config
        self.client = LLMClient(config, cache, accounting, prefix_share, budget)

    @property
    def accounting(self) -> RunAccounting:
        return self.client.accounting

    def attempts(self, messages: list[dict[str, str]], verdict: VerdictFormat[Any]) -> list[JudgeRequest]:
        """The requests of one logical judge call, in order: each is sent only after the answer to
        the one before failed to parse."""
        cfg = self.config
        if cfg.cache_control:
            messages = with_cache_breakpoint(messages)
        constraint = verdict.constraint() if cfg.is_embedded else None
        return [
            JudgeRequest(messages, cfg.temperature if attempt == 0 else cfg.retry_temperature, attempt, constraint)
            for attempt in range(cfg.max_attempts)
        ]

    async def verdict(self, dimension: str, messages: list[dict[str, str]], verdict: VerdictFormat[T]) -> T:
        """One logical judge call; raises LLMCallFailed (JudgeCallFailed when every answer failed to
        parse, RequestRejected at once when the provider refuses the request) when no verdict can be had.

        Only answers whose verdict parses are cached; a re-run first looks for any attempt's cached
        verdict, so it reproduces the run without asking again."""
        acc = self.accounting.purpose(dimension)
        requests = self.attempts(messages, verdict)
        for r in requests:
            hit = await self.client.cached(r.messages, r.temperature, r.attempt, r.constraint)
            if hit is not None and verdict_parses(verdict, hit):
                acc.cache_hits += 1
                return verdict.parse(hit)
        last_answer = ""
        for r in requests:
            last_answer = await self.client.complete(
                dimension, r.messages, r.temperature, r.attempt, r.constraint, accept=lambda text: verdict_parses(verdict, text)
            )
            try:
                return verdict.parse(last_answer)
            except VerdictParseError:
                acc.parse_failures += 1
        acc.failed_calls += 1
        raise JudgeCallFailed(
            f"no parseable verdict after {self.config.max_attempts} attempts (last answer ends {last_answer[-160:]!r})"
        )


def verdict_parses(verdict: VerdictFormat[Any], text: str) -> bool:
    """Whether `text` holds a verdict in the `verdict` format."""
    try:
        verdict.parse(text)
    except VerdictParseError:
        return False
    return True

"""Accounting of model requests: counts, tokens and cost per purpose, the run's `accounting.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from longreward_core.data.records import DIMENSIONS


@dataclass
class CallAccounting:
    """Model usage for one purpose (or overall)."""

    calls: int = 0  # requests that reached the model (cache hits excluded)
    batch_calls: int = 0  # of those, the ones answered through a provider's Batch API (the rest went online)
    batch_failed_lines: int = 0  # batch lines that came back failed or expired (each asked again or given up)
    cache_hits: int = 0
    coalesced: int = 0  # requests answered by an identical request already in flight
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # 0 where litellm does not know the model's price; at cached prices where reported
    cached_tokens: int = 0  # prompt tokens the provider reports served from its prompt cache
    tokenized_prompt_tokens: int = 0  # prompt tokens in the configured tokenizer (where counted)
    cacheable_tokens: int = 0  # of those, the prefix shared with an earlier request to the same model
    parse_failures: int = 0  # judge answers without a parseable verdict (judging purposes only)
    transport_errors: int = 0  # 429 / 5xx / timeouts / connection errors, each retried or fatal
    rejected: int = 0  # requests the provider refused for good (4xx: context length, content filter, ...)
    failed_calls: int = 0  # logical calls that gave up (unreachable, refused, or no verdict after every attempt)

    def add(self, other: CallAccounting) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def cacheable_share(self) -> float | None:
        """Share of the prompt tokens a provider's prefix cache could serve (None: nothing counted)."""
        return self.cacheable_tokens / self.tokenized_prompt_tokens if self.tokenized_prompt_tokens else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cacheable_share": self.cacheable_share}


_FIELDS = tuple(f.name for f in fields(CallAccounting))


@dataclass
class RunAccounting:
    """Model usage of a run, per purpose (a judged dimension, `sampling`, `generation`, ...) and in total."""

    per_purpose: dict[str, CallAccounting] = field(
        default_factory=lambda: {d: CallAccounting() for d in DIMENSIONS}
    )

    def purpose(self, name: str) -> CallAccounting:
        return self.per_purpose.setdefault(name, CallAccounting())

    def add(self, other: RunAccounting) -> None:
        for name, acc in other.per_purpose.items():
            self.purpose(name).add(acc)

    @property
    def total(self) -> CallAccounting:
        total = CallAccounting()
        for acc in self.per_purpose.values():
            total.add(acc)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.to_dict(),
            "per_purpose": {k: v.to_dict() for k, v in self.per_purpose.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunAccounting:
        return cls(
            per_purpose={
                k: CallAccounting(**{f: v[f] for f in _FIELDS if f in v}) for k, v in data.get("per_purpose", {}).items()
            }
        )

"""Accounting of model requests: counts, tokens and cost per purpose, the run's `accounting.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longreward_core.data.records import DIMENSIONS, CallAccounting, RequestAccounting


@dataclass
class RunAccounting:
    """Model usage of a run, per purpose (a judged dimension, `sampling`, `generation`, ...) and in total."""

    per_purpose: dict[str, CallAccounting] = field(
        default_factory=lambda: {d: CallAccounting() for d in DIMENSIONS}
    )

    def purpose(self, name: str) -> CallAccounting:
        return self.per_purpose.setdefault(name, CallAccounting())

    def add(self, other: RunAccounting | RequestAccounting) -> None:
        for name, acc in other.per_purpose.items():
            self.purpose(name).add(acc)

    @property
    def total(self) -> CallAccounting:
        total = CallAccounting()
        for acc in self.per_purpose.values():
            total.add(acc)
        return total

    def record(self) -> RequestAccounting:
        """The counts as they stand now (a copy: counting goes on here)."""
        return RequestAccounting(total=self.total, per_purpose={k: v.model_copy() for k, v in self.per_purpose.items()})

    def to_dict(self) -> dict[str, Any]:
        return self.record().model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunAccounting:
        return cls(per_purpose={k: CallAccounting.model_validate(v) for k, v in data.get("per_purpose", {}).items()})

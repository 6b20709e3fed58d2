"""A judge budget: tokens and cost a scoring run may spend, counted over the work it stands on.

Every answer a run uses counts at what it cost when it was asked, whether it was asked now or
found in the call cache (which stores each answer's usage and cost). So a re-run with the same
budget stops where the first run stopped and asks nothing, and a re-run with a larger one goes
on from there without asking anything again. The scorer checks the budget before it starts a
prompt: prompts in flight finish, no new prompt starts. Cost counts only where litellm knows the
model's price.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Budget:
    max_cost_usd: float | None = None
    max_tokens: int | None = None
    cost_usd: float = 0.0
    tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def spend(self, tokens: int, cost_usd: float) -> None:
        with self._lock:
            self.tokens += int(tokens or 0)
            self.cost_usd += float(cost_usd or 0.0)

    @property
    def reached(self) -> str | None:
        """Which limit was reached, in words; None while within budget."""
        if self.max_cost_usd is not None and self.cost_usd >= self.max_cost_usd:
            return f"judge cost {self.cost_usd:.4f} USD reached the budget of {self.max_cost_usd} USD"
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            return f"judge tokens {self.tokens} reached the budget of {self.max_tokens}"
        return None

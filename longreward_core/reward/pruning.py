"""Exact pair pruning: score only the support checks that can still change a prompt's pair.

A build publishes one pair per prompt, its best and its worst candidate (`data.pairs`). Once the
cheap dimensions are known, each candidate's reward lies in an interval: an unknown dimension
anywhere in [0, 10]; faithfulness with k of its S support verdicts known between their sum and
their sum plus the S - k unknown ones, times 10 / S. `PairRace` keeps these intervals and names the
candidates whose support checks can still matter; `check_support_pruned` asks for those checks in
deterministic rounds, re-deciding after each, until the pair is decided.

Exact: the pair `build_pairs` makes from the pruned scores (chosen id, rejected id, both rewards,
or the reason there is none) is the one the full schedule gives, whatever the unscored checks
would have answered, failures included. A candidate may be left unscored only when
- at least `min_candidates` candidates are completely scored (so the full run reaches the count
  whatever the others do), and no open candidate's interval can beat the best of them or fall
  below the worst of them under the deterministic tie-break (so best and worst are scored); or
- fewer than `min_candidates` candidates can still be scored (the prompt gets no pair either way).
A candidate that fails is out of the race, and the others are reconsidered (reopened) from there.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from longreward_core.data.pairs import PairConfig
from longreward_core.data.records import DIMENSIONS
from longreward_core.models.client import AuthenticationFailed

LOW, HIGH = 0.0, 10.0
# Support checks one prompt asks for in one round: enough to keep the judge busy across prompts,
# few enough that a decided pair stops the round's neighbours from being asked.
CHECKS_PER_ROUND = 4


def reward_of(scores: list[float]) -> float:
    """The reward of four dimension scores, computed exactly as `CandidateScore.reward` does, so
    bounds and rewards compare without rounding surprises."""
    return sum(scores) / len(scores)


def faithfulness_of(supports: float, statements: int) -> float:
    """Faithfulness from the sum of support values, as `faithfulness.score_faithfulness` computes it."""
    return 10.0 * supports / statements


@dataclass
class Contestant:
    """What is known of one candidate: dimension scores (None: unknown), failure, statements."""

    candidate_id: str
    scores: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS))
    failed: bool = False
    statements: int | None = None  # distinct statements to check; None: not extracted yet
    verdicts: dict[int, float] = field(default_factory=dict)  # statement index -> 1 / 0.5 / 0

    def _dimension_bounds(self, dimension: str) -> tuple[float, float]:
        known = self.scores[dimension]
        if known is not None:
            return known, known
        if dimension == "faithfulness" and self.statements is not None:
            supports = sum(self.verdicts.values())
            unknown = self.statements - len(self.verdicts)
            return faithfulness_of(supports, self.statements), faithfulness_of(supports + unknown * 1.0, self.statements)
        return LOW, HIGH

    @property
    def bounds(self) -> tuple[float, float]:
        """The reward interval: every reward the unknown scores could still make."""
        lows, highs = zip(*(self._dimension_bounds(d) for d in DIMENSIONS), strict=True)
        return reward_of(list(lows)), reward_of(list(highs))

    @property
    def complete(self) -> bool:
        return not self.failed and all(self.scores[d] is not None for d in DIMENSIONS)

    @property
    def open(self) -> bool:
        return not self.failed and not self.complete

    def record_support(self, index: int, value: float) -> None:
        self.verdicts[index] = value
        if self.statements is not None and len(self.verdicts) == self.statements:
            self.scores["faithfulness"] = faithfulness_of(sum(self.verdicts[i] for i in range(self.statements)), self.statements)


class PairRace:
    """The candidates of one prompt and what is known of them; `needed` says who still matters."""

    def __init__(self, candidate_ids: list[str], config: PairConfig):
        self.config = config
        self.contestants = {cid: Contestant(cid) for cid in candidate_ids}

    def __getitem__(self, candidate_id: str) -> Contestant:
        return self.contestants[candidate_id]

    def needed(self) -> list[str]:
        """The open candidates whose scores can still change the pair, most decisive first (the
        highest upper bound and the lowest lower bound lead); empty once the pair is decided."""
        complete = [(c.candidate_id, c.bounds[0]) for c in self.contestants.values() if c.complete]
        open_ = [c for c in self.contestants.values() if c.open]
        if len(complete) + len(open_) < self.config.min_candidates:
            return []  # no pair whatever the open ones score: nothing left to learn
        if len(complete) >= self.config.min_candidates:
            best_id, best = min(complete, key=lambda g: (-g[1], g[0]))
            worst_id, worst = max(complete, key=lambda g: (-g[1], g[0]))
            open_ = [c for c in open_ if _may_beat(c, best_id, best) or _may_undercut(c, worst_id, worst)]
        return _by_priority(open_)


def _may_beat(c: Contestant, best_id: str, best: float) -> bool:
    high = c.bounds[1]
    return high > best or (high == best and c.candidate_id < best_id)


def _may_undercut(c: Contestant, worst_id: str, worst: float) -> bool:
    low = c.bounds[0]
    return low < worst or (low == worst and c.candidate_id > worst_id)


def _by_priority(contestants: list[Contestant]) -> list[str]:
    """The likeliest best (highest upper bound) and worst (lowest lower bound) first, then the
    cheapest to finish (fewest unknown verdicts): those complete the count at the least cost."""
    if not contestants:
        return []
    top = min(contestants, key=lambda c: (-c.bounds[1], c.candidate_id))
    bottom = min(contestants, key=lambda c: (c.bounds[0], _descending(c.candidate_id)))
    rest = sorted(
        (c for c in contestants if c is not top and c is not bottom),
        key=lambda c: ((c.statements or 0) - len(c.verdicts), c.candidate_id),
    )
    return list(dict.fromkeys([top.candidate_id, bottom.candidate_id, *(c.candidate_id for c in rest)]))


def _descending(text: str) -> tuple[int, ...]:
    return tuple(-ord(ch) for ch in text) + (1,)


@dataclass
class SupportOutcome:
    """The result of the pruned support checks of one prompt."""

    failures: dict[str, Exception] = field(default_factory=dict)  # candidate -> why its faithfulness failed
    checks_saved: int = 0  # distinct statements never graded


async def check_support_pruned(race: PairRace, statements: dict[str, list[str]], checks) -> SupportOutcome:
    """Grade statements of the candidates in `statements` (those whose extraction succeeded, with
    `race` told their counts) until `race.needed()` is empty, in rounds of up to CHECKS_PER_ROUND
    checks; every round depends only on the answers before it, so a re-run asks nothing new.
    `checks` is the prompt's `faithfulness.SupportChecks`. Refused credentials end the prompt."""
    outcome = SupportOutcome()
    holders: dict[str, list[tuple[str, int]]] = {}
    for cid, texts in statements.items():
        for i, text in enumerate(texts):
            holders.setdefault(text, []).append((cid, i))
    asked: set[str] = set()
    while True:
        picks = _round(race, statements, asked)
        if not picks:
            break
        asked.update(picks)
        results = await asyncio.gather(*checks.start(picks), return_exceptions=True)
        for text, result in zip(picks, results, strict=True):
            if isinstance(result, AuthenticationFailed):
                raise result
            for cid, i in holders[text]:
                contestant = race[cid]
                if contestant.failed:
                    continue
                if isinstance(result, BaseException):
                    contestant.failed = True
                    outcome.failures[cid] = result if isinstance(result, Exception) else RuntimeError(str(result))
                else:
                    contestant.record_support(i, result)
    outcome.checks_saved = len(set(holders) - asked)
    return outcome


def _round(race: PairRace, statements: dict[str, list[str]], asked: set[str]) -> list[str]:
    """The next round's statements: one per needed candidate in priority order, then more, up to
    CHECKS_PER_ROUND."""
    queues = [
        [t for i, t in enumerate(statements[cid]) if i not in race[cid].verdicts and t not in asked]
        for cid in race.needed()
        if cid in statements
    ]
    picks: list[str] = []
    depth = 0
    while len(picks) < CHECKS_PER_ROUND and any(len(q) > depth for q in queues):
        for queue in queues:
            if len(queue) > depth and queue[depth] not in picks and len(picks) < CHECKS_PER_ROUND:
                picks.append(queue[depth])
        depth += 1
    return picks

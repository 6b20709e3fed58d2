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

Which checks come first decides the bill, not the pair: a pair needs `min_candidates` complete
candidates, among them the best and the worst, and every completed candidate narrows what the
open ones can still change. So until the count is reached only the leading contenders for best
and worst and the cheapest candidates that complete the count are checked (`PairRace.to_check`),
a leader's statements before the next candidate's; then whatever is still needed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from longreward_core.data.pairs import PairConfig
from longreward_core.data.records import DIMENSIONS
from longreward_core.models.errors import ConfigurationError

LOW, HIGH = 0.0, 10.0
# Support checks one prompt asks for in one round: enough to keep the judge busy across prompts,
# few enough that a decided pair stops the round's neighbours from being asked.
CHECKS_PER_ROUND = 4


def reward_of(scores: list[float]) -> float:
    """The reward of four dimension scores, computed exactly as `CandidateScore.reward` does, so
    bounds and rewards compare without rounding surprises."""
    return sum(scores) / len(scores)


def faithfulness_of(supports: float, statements: int) -> float:
    """Faithfulness from the sum of support values, as `faithfulness.plan` computes it."""
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
        """The open candidates whose scores can still change the pair, the ones to check first
        first (`_by_priority`); empty once the pair is decided."""
        complete = self._complete()
        open_ = [c for c in self.contestants.values() if c.open]
        if len(complete) + len(open_) < self.config.min_candidates:
            return []  # no pair whatever the open ones score: nothing left to learn
        if len(complete) >= self.config.min_candidates:
            best_id, best = _best(complete)
            worst_id, worst = _worst(complete)
            open_ = [c for c in open_ if _may_beat(c, best_id, best) or _may_undercut(c, worst_id, worst)]
        return _by_priority(open_, complete)

    def to_check(self) -> list[str]:
        """The needed candidates to check now, in order. Until `min_candidates` are complete, only
        the leading contenders for best and worst and the cheapest candidates that complete the
        count: starting others would pay for checks that the count, once reached, may make useless
        (every completed candidate narrows what the open ones can still change)."""
        needed = self.needed()
        missing = self.config.min_candidates - len(self._complete())
        if missing <= 0:
            return needed
        leaders = len(_leaders([self.contestants[cid] for cid in needed], self._complete()))
        return needed[: max(leaders, missing)]

    def _complete(self) -> list[tuple[str, float]]:
        return [(c.candidate_id, c.bounds[0]) for c in self.contestants.values() if c.complete]


def _best(complete: list[tuple[str, float]]) -> tuple[str, float]:
    """The complete candidate the pair rule would choose (highest reward, then smallest id)."""
    return min(complete, key=lambda g: (-g[1], g[0]))


def _worst(complete: list[tuple[str, float]]) -> tuple[str, float]:
    """The complete candidate the pair rule would reject (lowest reward, then largest id)."""
    return max(complete, key=lambda g: (-g[1], g[0]))


def _may_beat(c: Contestant, best_id: str, best: float) -> bool:
    high = c.bounds[1]
    return high > best or (high == best and c.candidate_id < best_id)


def _may_undercut(c: Contestant, worst_id: str, worst: float) -> bool:
    low = c.bounds[0]
    return low < worst or (low == worst and c.candidate_id > worst_id)


def _leaders(contestants: list[Contestant], complete: list[tuple[str, float]]) -> list[Contestant]:
    """The open candidate likeliest to become best (the highest upper bound among those that may
    beat the best complete one) and the one likeliest to become worst (the lowest lower bound among
    those that may fall below the worst complete one); with none complete, among all."""
    ups = downs = contestants
    if complete:
        best_id, best = _best(complete)
        worst_id, worst = _worst(complete)
        ups = [c for c in contestants if _may_beat(c, best_id, best)]
        downs = [c for c in contestants if _may_undercut(c, worst_id, worst)]
    leaders = []
    if ups:
        leaders.append(min(ups, key=lambda c: (-c.bounds[1], c.candidate_id)))
    if downs:
        bottom = min(downs, key=lambda c: (c.bounds[0], _descending(c.candidate_id)))
        if bottom not in leaders:
            leaders.append(bottom)
    return leaders


def _by_priority(contestants: list[Contestant], complete: list[tuple[str, float]]) -> list[str]:
    """The leading contenders for best and worst first (`_leaders`), then the cheapest to finish
    (fewest unknown verdicts): those complete the count at the least cost."""
    leaders = _leaders(contestants, complete)
    rest = sorted(
        (c for c in contestants if c not in leaders),
        key=lambda c: ((c.statements or 0) - len(c.verdicts), c.candidate_id),
    )
    return [c.candidate_id for c in [*leaders, *rest]]


def _descending(text: str) -> tuple[int, ...]:
    return tuple(-ord(ch) for ch in text) + (1,)


@dataclass
class SupportOutcome:
    """The result of the pruned support checks of one prompt."""

    failures: dict[str, Exception] = field(default_factory=dict)  # candidate -> why its faithfulness failed
    checks_saved: int = 0  # distinct statements never graded


class SupportRounds:
    """The support checks of one prompt in deterministic rounds: `next()` names the next round's
    statements (those of the candidates `race.to_check()` names, up to `per_round`; none once
    `race.needed()` is empty), `record()` takes their verdicts. Every round depends only on the
    answers before it, so a re-run asks nothing new; any executor can run them (online, each round
    as soon as the last one is answered; in batch mode, a round per wave)."""

    def __init__(self, race: PairRace, statements: dict[str, list[str]], per_round: int = CHECKS_PER_ROUND):
        self.race = race
        self.statements = statements
        self.per_round = per_round
        self.outcome = SupportOutcome()
        self.asked: set[str] = set()
        self._holders: dict[str, list[tuple[str, int]]] = {}
        for cid, texts in statements.items():
            for i, text in enumerate(texts):
                self._holders.setdefault(text, []).append((cid, i))

    def next(self) -> list[str]:
        """The next round's statements; empty when the pair is decided (the outcome is then final)."""
        picks = _round(self.race, self.statements, self.asked, self.per_round)
        self.asked.update(picks)
        self.outcome.checks_saved = len(set(self._holders) - self.asked)
        return picks

    def record(self, picks: list[str], results: list[object]) -> None:
        """The verdicts of a round (a value, or the exception its check failed with); refused
        credentials end the prompt."""
        for text, result in zip(picks, results, strict=True):
            if isinstance(result, ConfigurationError):
                raise result
            for cid, i in self._holders[text]:
                contestant = self.race[cid]
                if contestant.failed:
                    continue
                if isinstance(result, BaseException):
                    contestant.failed = True
                    self.outcome.failures[cid] = result if isinstance(result, Exception) else RuntimeError(str(result))
                else:
                    contestant.record_support(i, result)


async def check_support_pruned(race: PairRace, statements: dict[str, list[str]], checks) -> SupportOutcome:
    """Grade statements of the candidates in `statements` (those whose extraction succeeded, with
    `race` told their counts) in the rounds of `SupportRounds`, each as soon as the one before is
    answered. `checks.start(statements)` starts the support checks of `statements` (the scorer
    releases them from the prompt's plan, `reward.plan`) and returns their verdicts to await."""
    rounds = SupportRounds(race, statements)
    while picks := rounds.next():
        rounds.record(picks, await asyncio.gather(*checks.start(picks), return_exceptions=True))
    return rounds.outcome


def _round(race: PairRace, statements: dict[str, list[str]], asked: set[str], per_round: int) -> list[str]:
    """The next round's statements, up to `per_round`: the unknown ones of the candidates
    `race.to_check()` names, the first candidate's before the next one's (a leader's checks
    decide the most); all needed candidates where those have none left."""
    for candidates in (race.to_check(), race.needed()):
        picks: list[str] = []
        for cid in candidates:
            for i, text in enumerate(statements.get(cid, ())):
                if len(picks) == per_round:
                    return picks
                if i not in race[cid].verdicts and text not in asked and text not in picks:
                    picks.append(text)
        if picks:
            return picks
    return []

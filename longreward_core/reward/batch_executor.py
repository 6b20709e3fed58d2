"""Batch mode: the prompts' plans answered in waves through the judge provider's Batch API.

The plan (`reward.plan.PlanRun`) of every prompt starts at once. A wave: every need that can be
answered here is (evidence from the chunk index, judge requests from the call cache, support-check
rounds released under pair pruning), which leaves the judge requests nobody answered yet; those
become the lines of a batch (custom_id = the request's cache key, files split at the provider's
limits), written down in the run's ledger (`models.batch.BatchLedger`) before anything waits for
them. The executor then polls the wave's batches with a sleep between polls, stores their answers
in the call cache, and starts the next wave with what they unlocked.

A request's state is read from the call cache and the ledger, never from memory, so a re-run (or a
worker that died while waiting) reaches the same state and polls the same batches: a line is
submitted again only after a finished batch failed it. The online mode's attempt rules hold: an
answer without a parseable verdict moves the judge call to its next, hotter attempt (next wave);
a failed or expired line is asked again next wave, up to `transport_retries` times more, then the
judge call fails as an unreachable one; a line the provider refused (4xx) fails it at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from longreward_core.data.records import BatchSummary, Candidate, CandidateScore, Prompt, RequestAccounting
from longreward_core.models.batch import (
    BROKEN,
    UNACCEPTED,
    BatchFailed,
    BatchLedger,
    BatchLine,
    BatchTransport,
    LineResult,
    split_lines,
)
from longreward_core.models.client import litellm_module
from longreward_core.models.errors import AuthenticationFailed, LLMCallFailed, RequestRejected, is_refusal
from longreward_core.reward.dimensions import faithfulness
from longreward_core.reward.judge import Judge, JudgeCallFailed, JudgeRequest, verdict_parses
from longreward_core.reward.plan import Leaf, PlanRun
from longreward_core.reward.pruning import SupportRounds
from longreward_core.reward.scorer import PrunedPrompt, Scorer, candidate_score
from longreward_core.reward.steps import Ask, Evidence, PromptInputs

# Support checks one prompt releases per wave under pair pruning: a wave takes hours, so a round
# is larger than online (where the next round follows in seconds); pairs are the same either way.
BATCH_CHECKS_PER_ROUND = 8


def pause(seconds: float) -> None:
    """The wait between two polls of a wave's batches (a sleep: a waiting run uses no CPU)."""
    time.sleep(seconds)


@dataclass
class WaveReport:
    """What a wave is doing, as the CLI prints it: its lines, batches and their status."""

    wave: int
    lines: int
    batch_ids: list[str]
    status: dict[str, str]  # batch id -> the provider's status
    elapsed_s: float


class PromptPlan:
    """One prompt's plan in batch mode: its document prepared and indexed, its evidence retrieved
    here, and under pair pruning its support checks released round by round."""

    def __init__(self, scorer: Scorer, prompt: Prompt, candidates: list[Candidate]):
        self.scorer, self.prompt, self.candidates = scorer, prompt, candidates
        self.doc = scorer.prepare(prompt.context)
        self.doc.index_into(scorer.index)
        inputs = PromptInputs.of(prompt, self.doc.completeness_chunks)
        self.language = inputs.language
        self.prune = scorer.config.prune
        self.run = PlanRun(
            inputs, {c.candidate_id: c.response for c in candidates},
            held=frozenset({faithfulness.check_support}) if self.prune else frozenset(),
        )
        self.scores: list[CandidateScore] | None = None
        self._finished: set[str] = set()
        self._pruned: PrunedPrompt | None = None
        self._rounds: SupportRounds | None = None
        self._picks: list[str] = []

    def retrieve(self, statements: list[str]) -> list[str]:
        hits = self.scorer.index.query(self.doc.doc_id, self.doc.chunking, statements, self.scorer.config.top_k)
        return [self.doc.evidence(h) for h in hits]

    def advance(self, on_scored: Callable[[CandidateScore], None] | None) -> list[Leaf]:
        """Needs that became ready without an answer (a pruning round released); sets `scores`
        once every candidate is decided."""
        if self.scores is not None:
            return []
        if not self.prune:
            self._finished.update(self.run.finished())
            if len(self._finished) == len(self.candidates):
                self.scores = [candidate_score(self.prompt.id, self.language, self.run, c.candidate_id) for c in self.candidates]
                for score in self.scores if on_scored is not None else ():
                    on_scored(score)
            return []
        while True:
            if self._rounds is None:
                if not self.run.settled():
                    return []
                self._pruned = PrunedPrompt(self.prompt, self.candidates, self.language, self.run, self.scorer.pairs)
                self._rounds = SupportRounds(self._pruned.race, self._pruned.statements, BATCH_CHECKS_PER_ROUND)
            elif self._picks:
                outcomes = [self.run.step_outcome(faithfulness.support_check(s)) for s in self._picks]
                if any(o is None for o in outcomes):
                    return []
                self._rounds.record(self._picks, [o.error if o.error is not None else o.value for o in outcomes])
            self._picks = self._rounds.next()
            if not self._picks:
                assert self._pruned is not None
                self.scores = self._pruned.scores(self._rounds.outcome, self.scorer.pruning, on_scored)
                return []
            ready = self.run.release([faithfulness.support_check(s) for s in self._picks])
            if ready:
                return ready


@dataclass(eq=False)
class _Call:
    """A judge call waiting for a batch: its attempts' requests, keys and the attempt it is at."""

    plan: PromptPlan
    ask: Ask
    requests: list[JudgeRequest]
    keys: list[str]
    params: list[dict[str, Any]]
    attempt: int = 0


@dataclass
class BatchOutcome:
    """What batch mode did over a run."""

    waves: int = 0
    batch_ids: list[str] = field(default_factory=list)
    lines_submitted: int = 0
    budget_reached: str | None = None  # why the last waves were not submitted


class BatchExecutor:
    """Runs prompt plans in waves through `transport`, recording every batch in `ledger`."""

    def __init__(
        self, judge: Judge, transport: BatchTransport, ledger: BatchLedger, *, poll_s: float, max_lines: int,
        max_bytes: int, on_wave: Callable[[WaveReport], None] | None = None,
    ):
        self.judge, self.client = judge, judge.client
        self.transport, self.ledger = transport, ledger
        self.poll_s, self.max_lines, self.max_bytes = poll_s, max_lines, max_bytes
        self.on_wave = on_wave
        self.outcome = BatchOutcome()
        self._waiting: dict[str, list[_Call]] = {}  # cache key -> the calls waiting for its answer
        self._calls: dict[Ask, _Call] = {}
        self._unclaimed: dict[str, LineResult] = {}  # answers read before any call waited for them
        self._history: tuple[dict[str, int], dict[str, str], set[str]] = ({}, {}, set())

    def run(self, plans: list[PromptPlan], on_scored: Callable[[CandidateScore], None] | None = None) -> None:
        """Run `plans` until every prompt is scored (or the judge budget stops new waves)."""
        self._on_scored = on_scored
        ready = [(plan, leaf) for plan in plans for leaf in plan.run.start()]
        while True:
            self._settle(plans, ready)
            live = self.ledger.live()
            if live:
                ready = self._wait(live)
                continue
            lines = self._lines()
            if not lines:
                break
            budget = self.client.budget
            if budget is not None and budget.reached:
                self.outcome.budget_reached = budget.reached
                return
            self._submit(lines)
            ready = []
        if any(plan.scores is None for plan in plans):
            raise RuntimeError("batch mode: a plan waits for an answer nobody was asked for")

    # -- answering what can be answered here ------------------------------------------------
    def _settle(self, plans: list[PromptPlan], ready: Iterable[tuple[PromptPlan, Any]]) -> None:
        """Answer every need that needs no batch, until only batch lines are left."""
        self._history = self.ledger.history()
        queue = deque(ready)
        while True:
            while queue:
                evidence: dict[PromptPlan, list[Evidence]] = {}
                while queue:
                    plan, need = queue.popleft()
                    if isinstance(need, Evidence):
                        evidence.setdefault(plan, []).append(need)
                    elif isinstance(need, _Call):
                        queue.extend((plan, leaf) for leaf in self._classify(need))
                    else:
                        queue.extend((plan, leaf) for leaf in self._classify(self._call(plan, need)))
                for plan, leaves in evidence.items():
                    queue.extend((plan, leaf) for leaf in self._retrieve(plan, leaves))
            for plan in plans:
                queue.extend((plan, leaf) for leaf in plan.advance(self._on_scored))
            if not queue:
                return

    def _retrieve(self, plan: PromptPlan, leaves: list[Evidence]) -> list[Leaf]:
        try:
            texts = plan.retrieve([leaf.statement for leaf in leaves])
        except Exception as exc:
            return [ready for leaf in leaves for ready in plan.run.resolve(leaf, error=exc)]
        return [ready for leaf, text in zip(leaves, texts, strict=True) for ready in plan.run.resolve(leaf, text)]

    def _call(self, plan: PromptPlan, ask: Ask) -> _Call:
        requests = self.judge.attempts(ask.messages, ask.verdict)
        keyed = [self.client.request_key(r.messages, r.temperature, r.attempt, r.constraint) for r in requests]
        call = _Call(plan, ask, requests, [k for k, _ in keyed], [p for _, p in keyed])
        self._calls[ask] = call
        return call

    def _classify(self, call: _Call) -> list[Leaf]:
        """Answer `call` from the cache or from what its lines' batches said, or leave it waiting
        for a batch line (its current attempt's); the needs its answer made ready."""
        acc = self.judge.accounting.purpose(call.ask.dimension)
        verdict = call.ask.verdict
        for r in call.requests:
            hit = self.client.cached_in_thread(r.messages, r.temperature, r.attempt, r.constraint)
            if hit is not None and verdict_parses(verdict, hit):
                acc.cache_hits += 1
                return self._resolve(call, verdict.parse(hit))
        failures, last, live = self._history
        limit = self.judge.config.transport_retries + 1
        while call.attempt < len(call.keys):
            key = call.keys[call.attempt]
            if key in self._unclaimed:
                claimed = self._store(self._unclaimed.pop(key), [call], {})
                if claimed is None:
                    return self._classify(call)  # answered: now in the cache
                if claimed == UNACCEPTED:
                    call.attempt += 1
                    continue
            outcome = last.get(key) if key not in live else None
            if outcome == UNACCEPTED:
                call.attempt += 1
                continue
            if outcome is not None and outcome.startswith("rejected"):
                acc.failed_calls += 1
                return self._resolve(call, error=RequestRejected(f"{self.judge.config.model} rejected the request: {outcome}"))
            if failures.get(key, 0) >= limit and key not in live:
                acc.failed_calls += 1
                return self._resolve(call, error=LLMCallFailed(
                    f"batch line {key[:12]} of {self.judge.config.model} failed {failures[key]} times: {outcome}", transport=True,
                ))
            self._waiting.setdefault(key, []).append(call)
            return []
        acc.failed_calls += 1
        return self._resolve(call, error=JudgeCallFailed(f"no parseable verdict after {len(call.keys)} attempts"))

    def _resolve(self, call: _Call, value: Any = None, error: Exception | None = None) -> list[Leaf]:
        self._calls.pop(call.ask, None)
        return call.plan.run.resolve(call.ask, value, error)

    # -- batches ----------------------------------------------------------------------------
    def _lines(self) -> list[BatchLine]:
        live = self._history[2]
        lines = []
        for key, calls in self._waiting.items():
            if key not in live:
                call = calls[0]
                r = call.requests[call.attempt]
                lines.append(self.transport.line(key, r.messages, call.params[call.attempt]))
        return lines

    def _submit(self, lines: list[BatchLine]) -> None:
        wave = max((r.wave for r in self.ledger.records.values()), default=-1) + 1
        ids = []
        for part in split_lines(lines, self.max_lines, self.max_bytes):
            record = self.transport.submit(part, wave)
            self.ledger.submitted(record)  # written down before anything waits for it
            ids.append(record.batch_id)
        self.outcome.waves += 1
        self.outcome.lines_submitted += len(lines)
        self.outcome.batch_ids.extend(ids)
        self._report(wave, {i: "submitted" for i in ids}, time.monotonic())

    def _wait(self, live: list) -> list[tuple[PromptPlan, Any]]:
        """Poll `live` batches (sleeping `poll_s` between polls) until each finished, storing each
        one's answers as it finishes; the waiting calls, to classify again. A batch that failed or
        was cancelled stops the run once its answers are stored (BatchFailed names it)."""
        started = time.monotonic()
        pending = {record.batch_id: record for record in live}
        wave = min(record.wave for record in live)
        status: dict[str, str] = {}
        while pending:
            broken = []
            for batch_id, record in list(pending.items()):
                state = self.transport.state(batch_id)
                status[batch_id] = state.status
                if not state.finished:
                    continue
                del pending[batch_id]
                results = self.transport.results(state, record.custom_ids)
                outcomes: dict[str, str] = {}
                for key in record.custom_ids:
                    self._store(results[key], self._waiting.get(key, []), outcomes)
                self.ledger.read(batch_id, state.status, outcomes)
                if state.status in BROKEN:
                    unanswered = sum(1 for o in outcomes.values() if o != UNACCEPTED)
                    broken.append(
                        f"batch {batch_id} {state.status}" + (f" ({state.errors})" if state.errors else "")
                        + f", {unanswered} of its {len(record.custom_ids)} lines unanswered"
                    )
            self._report(wave, status, started)
            if broken:
                raise BatchFailed(
                    "; ".join(broken) + ". The answers given are kept in the call cache and the batch in the ledger "
                    f"({self.ledger.path}); run the same command again to submit the unanswered lines anew"
                )
            if pending:
                pause(self.poll_s)
        calls = [(call.plan, call) for calls in self._waiting.values() for call in calls]
        self._waiting.clear()
        return calls

    def _store(self, result: LineResult, calls: list[_Call], outcomes: dict[str, str]) -> str | None:
        """Store one line's answer (accounted as a batch request, cached if its verdict parses)
        or record in `outcomes` why it has none; that outcome (None: answered)."""
        key = result.custom_id
        if not calls:  # no call waits for it (yet): kept until one does
            self._unclaimed[key] = result
            return None
        call = calls[0]
        acc = self.judge.accounting.purpose(call.ask.dimension)
        if result.body is None:
            acc.batch_failed_lines += 1
            if result.status in (401, 403):
                raise AuthenticationFailed(f"{self.judge.config.model} refused the credentials of a batch (HTTP {result.status}): {result.error}")
            outcomes[key] = ("rejected: " if is_refusal(result.status) else "failed: ") + (result.error or "no answer")
            return outcomes[key]
        choices = result.body.get("choices") or [{}]
        text = (choices[0].get("message") or {}).get("content") or ""
        usage = litellm_module().Usage(**(result.body.get("usage") or {}))
        r = call.requests[call.attempt]
        self.client.record_answer(acc, key, r.messages, text, usage, self._cost(usage), lambda t: verdict_parses(call.ask.verdict, t))
        acc.batch_calls += 1
        if not verdict_parses(call.ask.verdict, text):
            acc.parse_failures += 1
            outcomes[key] = UNACCEPTED
        return outcomes.get(key)

    def _cost(self, usage: Any) -> float:
        from litellm.cost_calculator import batch_cost_calculator

        try:
            prompt_cost, completion_cost = batch_cost_calculator(usage, self.transport.model_name, self.transport.provider)
        except Exception:
            return 0.0
        return float(prompt_cost + completion_cost)

    def _report(self, wave: int, status: dict[str, str], started: float) -> None:
        if self.on_wave is not None:
            records = [self.ledger.records[i] for i in status if i in self.ledger.records]
            self.on_wave(WaveReport(wave, sum(len(r.custom_ids) for r in records), list(status), dict(status), time.monotonic() - started))


def batch_pricing(transport: BatchTransport) -> str:
    """How batch answers are priced: the provider's batch prices where litellm knows them, else
    half the online prices (litellm's rule)."""
    try:
        info = litellm_module().get_model_info(transport.model_name, custom_llm_provider=transport.provider)
    except Exception:
        return "unknown (litellm has no price for the model)"
    if info.get("input_cost_per_token_batches") is not None:
        return "the provider's batch prices"
    return "50% of the online prices"


def batch_summary(outcome: BatchOutcome, transport: BatchTransport, ledger: BatchLedger, judge: RequestAccounting) -> BatchSummary:
    """Batch mode's part of `accounting.json`: every batch of the run (this one and those it
    resumed), its waves, lines, requests by batch and online, and how batch answers were priced."""
    return BatchSummary(
        batch_ids=list(ledger.records),
        waves=ledger.waves(),
        lines_submitted=sum(len(r.custom_ids) for r in ledger.records.values()),
        waves_this_run=outcome.waves,
        lines_submitted_this_run=outcome.lines_submitted,
        requests_by_batch=judge.total.batch_calls,
        requests_online=judge.total.calls - judge.total.batch_calls,
        pricing=batch_pricing(transport),
        ledger=str(ledger.path),
    )


async def score_batched(
    scorer: Scorer, executor: BatchExecutor, prompts: Iterable[Prompt], candidates: Mapping[str, list[Candidate]],
    on_scored: Callable[[CandidateScore], None] | None = None, not_scored: list[str] | None = None,
) -> AsyncIterator[list[CandidateScore]]:
    """Score every prompt's candidates in batch mode; yields each prompt's scores once the waves
    are done (prompts left unscored by the judge budget are added to `not_scored`)."""

    def run() -> list[PromptPlan]:
        plans = [PromptPlan(scorer, p, candidates[p.id]) for p in prompts if candidates.get(p.id)]
        executor.run(plans, on_scored)
        return plans

    for plan in await asyncio.to_thread(run):
        if plan.scores is not None:
            yield plan.scores
        elif not_scored is not None:
            not_scored.append(plan.prompt.id)

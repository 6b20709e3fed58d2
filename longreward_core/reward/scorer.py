"""LongReward scoring of candidates: the four dimensions, run concurrently, and the reward.

Per prompt: the document is chunked (retrieval and completeness sizes), its retrieval chunks are
indexed once, and the prompt's plan (`reward.plan`: the dimensions' requests and what each waits
for, the completeness key points once per prompt) runs online: every request is asked as soon as
what it waits for is answered, across candidates and prompts, under the judge client's limits. A
dimension that fails is recorded with its reason and the candidate gets no reward; the run goes on.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from longreward_core.data.pairs import PairConfig
from longreward_core.data.records import (
    Candidate,
    CandidateScore,
    DimensionResult,
    Prompt,
)
from longreward_core.models.errors import ConfigurationError, LLMCallFailed, RequestRejected
from longreward_core.models.secrets import redact
from longreward_core.models.storage import StorageUnavailable
from longreward_core.reward.dimensions import faithfulness
from longreward_core.reward.documents import DocumentConfig, PreparedDocument, open_chunk_index, prepare_document
from longreward_core.reward.judge import Judge
from longreward_core.reward.plan import Leaf, Outcome, PlanRun
from longreward_core.reward.pruning import PairRace, SupportOutcome, check_support_pruned
from longreward_core.reward.retrieval import content_hash
from longreward_core.reward.steps import Ask, Evidence, PromptInputs, Step


class ScoringConfig(DocumentConfig):
    """How documents are chunked and searched (the fields of `DocumentConfig`), and how the scoring
    run goes: prompts in flight, the judge budget, pruning. Every field is a CLI option / flow parameter."""

    prompts_in_flight: int = Field(16, ge=1, description="Prompts scored at the same time.")
    max_judge_cost_usd: float | None = Field(
        None, gt=0, description="Judge budget in USD (where litellm knows the price): once reached, no new prompt is "
        "started; a re-run with a larger budget goes on without asking anything again."
    )
    max_judge_tokens: int | None = Field(
        None, ge=1, description="Judge budget in prompt + completion tokens, as --max-judge-cost-usd."
    )
    prune: bool = Field(
        False,
        description="Exact pair pruning: make only the support checks that can still change a prompt's pair "
        "(same pairs as the full schedule; candidates left undecided get status 'pruned').",
    )


def budget_share(config: ScoringConfig, parts: int) -> ScoringConfig:
    """`config` with its judge budget split evenly over `parts` runs (the shards of a build)."""
    return config.model_copy(update={
        "max_judge_cost_usd": config.max_judge_cost_usd / parts if config.max_judge_cost_usd is not None else None,
        "max_judge_tokens": max(1, config.max_judge_tokens // parts) if config.max_judge_tokens is not None else None,
    })


class Scorer:
    """Scores candidates with LongReward; owns the chunk index for the duration of a run."""

    def __init__(
        self, judge: Judge, config: ScoringConfig, index_path: str | Path | None = None, pairs: PairConfig | None = None
    ):
        self.judge = judge
        self.config = config
        self.pairs = pairs or PairConfig()  # the pair rules pruning decides by
        self.pruning = PruningStats()
        self.not_scored: list[str] = []  # prompts not started because the judge budget was reached
        self.index = open_chunk_index(config, index_path, cache=judge.client.cache, accounting=judge.accounting)
        self._documents: dict[str, PreparedDocument] = {}

    def prepare(self, context: str) -> PreparedDocument:
        """The document prepared once per run, completeness chunks included (blocking: call in a thread)."""
        doc_id = content_hash(context)
        if doc_id not in self._documents:
            doc = prepare_document(context, self.config)
            doc.completeness_chunks  # cut here, in the caller's worker thread, not in the event loop
            self._documents[doc_id] = doc
        return self._documents[doc_id]

    async def score(
        self,
        prompts: Iterable[Prompt],
        candidates: Mapping[str, list[Candidate]],
        on_scored: Callable[[CandidateScore], None] | None = None,
    ) -> AsyncIterator[list[CandidateScore]]:
        """Score the candidates of each prompt (`candidates`: by prompt id) and yield each prompt's
        scores, in its candidates' order, as soon as they are done. Prompts are taken from
        `prompts` only as a place in the window of `prompts_in_flight` opens, so a run holds that
        many documents, not all of them."""
        budget = self.judge.client.budget
        in_flight: Counter[str] = Counter()  # prompts being scored per document
        running: set[asyncio.Task[list[CandidateScore]]] = set()
        done: set[asyncio.Task[list[CandidateScore]]] = set()

        async def one_prompt(prompt: Prompt, group: list[Candidate]) -> list[CandidateScore]:
            doc_id = content_hash(prompt.context)
            in_flight[doc_id] += 1
            try:
                return await self._score_prompt(prompt, group, on_scored)
            finally:  # the prepared document is let go once no prompt in flight uses it
                in_flight[doc_id] -= 1
                if not in_flight[doc_id]:
                    self._documents.pop(doc_id, None)

        try:
            for prompt in prompts:
                group = candidates.get(prompt.id)
                if not group:
                    continue
                while len(running) >= self.config.prompts_in_flight:
                    done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        yield task.result()
                if budget is not None and budget.reached:
                    self.not_scored.append(prompt.id)
                    continue
                running.add(asyncio.ensure_future(one_prompt(prompt, group)))
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:  # a failure (a configuration error such as refused credentials) or a closed generator stops the other prompts
            for task in running:
                task.cancel()
            # Finished prompts that failed alike with the one raised are retrieved too (no "never retrieved" log).
            await asyncio.gather(*running, *done, return_exceptions=True)

    async def _score_prompt(
        self, prompt: Prompt, candidates: list[Candidate], on_scored: Callable[[CandidateScore], None] | None
    ) -> list[CandidateScore]:
        doc = await asyncio.to_thread(self.prepare, prompt.context)
        # Indexing (CPU) overlaps the first round of judge calls, which do not need it.
        indexed = asyncio.ensure_future(
            asyncio.to_thread(doc.index_into, self.index)
        )

        async def retrieve(statements: list[str]) -> list[str]:
            await indexed
            hits = await asyncio.to_thread(self.index.query, doc.doc_id, doc.chunking, statements, self.config.top_k)
            return [doc.evidence(h) for h in hits]

        inputs = PromptInputs.of(prompt, doc.completeness_chunks)
        language = inputs.language
        run = PlanRun(
            inputs, {c.candidate_id: c.response for c in candidates},
            held=frozenset({faithfulness.check_support}) if self.config.prune else frozenset(),
        )
        scores: dict[str, CandidateScore] = {}

        def finished(candidate_id: str) -> None:
            score = scores[candidate_id] = candidate_score(prompt.id, language, run, candidate_id)
            if on_scored is not None:
                on_scored(score)

        # The pruned schedule reports its scores once the rounds decided them.
        online = OnlineExecutor(run, self.judge, retrieve, None if self.config.prune else finished)
        try:
            online.launch(run.start())
            if self.config.prune:
                return await self._score_pruned(prompt, candidates, language, run, online, on_scored)
            await online.until(lambda: len(scores) == len(candidates))
            return [scores[c.candidate_id] for c in candidates]
        finally:
            if not indexed.done():
                indexed.cancel()
            # Requests nobody waits for any more (their candidates already failed) are stopped.
            await asyncio.gather(indexed, online.close(), return_exceptions=True)

    async def _score_pruned(
        self, prompt: Prompt, candidates: list[Candidate], language: str, run: PlanRun, online: OnlineExecutor,
        on_scored: Callable[[CandidateScore], None] | None,
    ) -> list[CandidateScore]:
        """Pair pruning (`reward.pruning`): the plan runs with its support checks held back, so every
        dimension but those checks ends for every candidate; then only the support checks that can
        still change the prompt's pair are released."""
        await online.until(run.settled)
        pruned = PrunedPrompt(prompt, candidates, language, run, self.pairs)
        outcome = await check_support_pruned(pruned.race, pruned.statements, _ReleasedSupportChecks(online))
        return pruned.scores(outcome, self.pruning, on_scored)

    def close(self) -> None:
        self.index.close()


@dataclass
class PruningStats:
    """What pair pruning left out over a run."""

    pruned: int = 0  # candidates left unscored
    support_checks_saved: int = 0  # distinct statements never graded


class PrunedPrompt:
    """A prompt under pair pruning once its plan settled (every dimension ended but the held
    support checks): the race of its candidates, the statements left to check, and, once the
    rounds decided the pair (`reward.pruning.SupportRounds`), its scores."""

    def __init__(self, prompt: Prompt, candidates: list[Candidate], language: str, run: PlanRun, pairs: PairConfig):
        self.prompt, self.candidates, self.language = prompt, candidates, language
        self.race = PairRace([c.candidate_id for c in candidates], pairs)
        self.statements: dict[str, list[str]] = {}
        self._faith: dict[str, DimensionResult] = {}
        self._cheap: dict[str, dict[str, DimensionResult]] = {}
        for c in candidates:
            contestant = self.race[c.candidate_id]
            outcomes = run.outcomes(c.candidate_id)
            cheap = self._cheap[c.candidate_id] = {
                name: _as_result(outcomes[name]) for name in ("helpfulness", "logicality", "completeness")
            }
            for name, result in cheap.items():
                contestant.scores[name] = result.score
                contestant.failed |= not result.ok
            if "faithfulness" in outcomes:  # the extraction failed, or found nothing to check
                extracted = self._faith[c.candidate_id] = _as_result(outcomes["faithfulness"])
                contestant.failed |= extracted.error is not None
                contestant.statements = extracted.statements
                contestant.scores["faithfulness"] = extracted.score
                continue
            found = [step.args[0] for step in run.held_steps(c.candidate_id, "faithfulness")]
            self._faith[c.candidate_id] = DimensionResult(statements=len(found))
            contestant.statements = len(found)
            if not contestant.failed:
                self.statements[c.candidate_id] = found

    def scores(
        self, outcome: SupportOutcome, stats: PruningStats, on_scored: Callable[[CandidateScore], None] | None
    ) -> list[CandidateScore]:
        """The candidates' scores in their order (undecided ones 'pruned', with their reward bounds)."""
        stats.support_checks_saved += outcome.checks_saved
        scores = []
        for c in self.candidates:
            contestant = self.race[c.candidate_id]
            f = self._faith[c.candidate_id]
            if c.candidate_id in outcome.failures:
                f = _as_result(Outcome(error=outcome.failures[c.candidate_id]))
                f.statements = contestant.statements
            elif contestant.scores["faithfulness"] is not None:
                f = DimensionResult(score=contestant.scores["faithfulness"], statements=contestant.statements)
            pruned = contestant.open
            low, high = contestant.bounds if pruned else (None, None)
            known = self._cheap[c.candidate_id]
            score = CandidateScore(
                prompt_id=self.prompt.id, candidate_id=c.candidate_id, language=self.language,
                helpfulness=known["helpfulness"], logicality=known["logicality"], faithfulness=f,
                completeness=known["completeness"], pruned=pruned, reward_low=low, reward_high=high,
            )
            stats.pruned += pruned
            if on_scored is not None:
                on_scored(score)
            scores.append(score)
        return scores


class OnlineExecutor:
    """Runs a `PlanRun` against the judge: every need is answered as soon as it is ready (judge
    calls asked at once, the client's limits queue them; the evidence of needs that became ready
    together retrieved in one query), and each answer advances the plan at once.

    `on_finished` is called with each candidate whose dimensions all ended. A configuration error
    (refused credentials, an unknown model) stops everything: `until` raises it, and so does every
    support check awaited (`release`)."""

    def __init__(
        self, run: PlanRun, judge: Judge, retrieve: Callable[[list[str]], Awaitable[list[str]]],
        on_finished: Callable[[str], None] | None,
    ):
        self.run = run
        self.judge = judge
        self.retrieve = retrieve
        self.on_finished = on_finished
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._stopped: BaseException | None = None
        self._steps: dict[Step, asyncio.Future[Any]] = {}

    def launch(self, leaves: list[Leaf]) -> None:
        """Answer `leaves` (what the plan returned as ready)."""
        evidence = [leaf for leaf in leaves if isinstance(leaf, Evidence)]
        if evidence:
            self._spawn(self._retrieve(evidence))
        for leaf in leaves:
            if isinstance(leaf, Ask):
                self._spawn(self._ask(leaf))
        self._report()

    def release(self, steps: list[Step]) -> list[asyncio.Future[Any]]:
        """Start held `steps`; their outcomes, to await."""
        self.launch(self.run.release(steps))
        futures = []
        for step in steps:
            if step not in self._steps:
                self._steps[step] = asyncio.get_running_loop().create_future()
                if self._stopped is not None:
                    self._steps[step].set_exception(self._stopped)
            futures.append(self._steps[step])
        self._report()
        return futures

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds (checked after every answer)."""
        while True:
            if self._stopped is not None:
                raise self._stopped
            if condition():
                return
            if not self._tasks:
                raise RuntimeError("the plan waits for an answer nobody was asked for")
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        """Stop the requests still in flight."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._changed.set()

    async def _ask(self, ask: Ask) -> None:
        try:
            value = await self.judge.verdict(ask.dimension, ask.messages, ask.verdict)
        except (ConfigurationError, StorageUnavailable) as exc:
            self._stop(exc)
        except Exception as exc:
            self._answer(ask, error=exc)
        else:
            self._answer(ask, value)

    async def _retrieve(self, leaves: list[Evidence]) -> None:
        try:
            texts = await self.retrieve([leaf.statement for leaf in leaves])
        except Exception as exc:
            for leaf in leaves:
                self._answer(leaf, error=exc)
        else:
            for leaf, text in zip(leaves, texts, strict=True):
                self._answer(leaf, text)

    def _answer(self, leaf: Leaf, value: Any = None, error: Exception | None = None) -> None:
        if self._stopped is not None:
            return
        try:
            self.launch(self.run.resolve(leaf, value, error))
        except Exception as exc:  # a fault of the plan or of `on_finished`, not of an answer
            self._stop(exc)

    def _report(self) -> None:
        for candidate_id in self.run.finished():
            if self.on_finished is not None:
                self.on_finished(candidate_id)
        for step, future in self._steps.items():
            outcome = self.run.step_outcome(step)
            if outcome is not None and not future.done():
                if outcome.error is not None:
                    future.set_exception(outcome.error)
                else:
                    future.set_result(outcome.value)
        self._changed.set()

    def _stop(self, exc: BaseException) -> None:
        if self._stopped is None:
            self._stopped = exc
            for future in self._steps.values():
                if not future.done():
                    future.set_exception(exc)
        self._changed.set()


class _ReleasedSupportChecks:
    """The support checks `reward.pruning` asks for, released from the plan's held ones."""

    def __init__(self, online: OnlineExecutor):
        self.online = online

    def start(self, statements: list[str]) -> list[asyncio.Future[Any]]:
        return self.online.release([faithfulness.support_check(s) for s in statements])


def candidate_score(prompt_id: str, language: str, run: PlanRun, candidate_id: str) -> CandidateScore:
    """The score of a candidate whose every dimension ended in `run`."""
    return CandidateScore(
        prompt_id=prompt_id, candidate_id=candidate_id, language=language,
        **{name: _as_result(outcome) for name, outcome in run.outcomes(candidate_id).items()},
    )


def _as_result(outcome: Outcome) -> DimensionResult:
    """A dimension's outcome: its score, or its failure with the reason. Only configuration errors
    (refused credentials, an unknown model) and storage that stayed down escape as an exception:
    they end the run, since every other request would fail alike."""
    exc = outcome.error
    if exc is None:
        value = outcome.value
        return value if isinstance(value, DimensionResult) else DimensionResult(score=float(value))
    if isinstance(exc, (ConfigurationError, StorageUnavailable)):
        raise exc
    if isinstance(exc, LLMCallFailed):
        return DimensionResult(error=str(exc), transport=exc.transport, rejected=isinstance(exc, RequestRejected))
    return DimensionResult(error=redact(f"{type(exc).__name__}: {exc}"))

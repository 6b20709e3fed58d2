"""LongReward scoring of candidates: the four dimensions, run concurrently, and the reward.

Per prompt: the document is chunked (retrieval and completeness sizes), its retrieval chunks are
indexed once, and the completeness key points are extracted once and shared by every candidate.
Per candidate the four dimensions run concurrently; across candidates and prompts everything
runs concurrently under the judge client's limits. A dimension that fails is recorded with its
reason and the candidate gets no reward; the run goes on.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from longreward_core.data.form import form_order
from longreward_core.data.pairs import PairConfig
from longreward_core.data.records import (
    Candidate,
    CandidateScore,
    DimensionResult,
    Prompt,
)
from longreward_core.models.accounting import RunAccounting
from longreward_core.models.call_cache import CallStore
from longreward_core.models.embeddings import EMBEDDED_EMBEDDING, make_embedder
from longreward_core.models.errors import ConfigurationError, LLMCallFailed, RequestRejected
from longreward_core.models.secrets import redact
from longreward_core.models.tokenizers import load_tokenizer
from longreward_core.reward.chunking import ChunkSpan, chunk_document
from longreward_core.reward.dimensions import (
    completeness,
    faithfulness,
    helpfulness,
    logicality,
)
from longreward_core.reward.judge import Judge
from longreward_core.reward.pruning import PairRace, check_support_pruned
from longreward_core.reward.prompts import detect_language
from longreward_core.reward.retrieval import ChunkIndex, content_hash


class ScoringConfig(BaseModel):
    """How documents are chunked and searched. Every field is a CLI option / flow parameter."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    retrieval_chunk_tokens: int = Field(128, ge=8, description="Tokens per retrieval chunk (faithfulness).")
    completeness_chunk_tokens: int = Field(4096, ge=64, description="Tokens per key-point extraction chunk.")
    top_k: int = Field(5, ge=1, description="Chunks retrieved per factual statement.")
    tokenizer: str | None = Field(None, description="Tokenizer name or path for chunking; None: the embedded model's.")
    embedding_model: str = Field(
        EMBEDDED_EMBEDDING, description="Embedding model: the embedded MiniLM, or a litellm embedding model string."
    )
    embedding_api_base: str | None = Field(None, description="Base URL for a litellm embedding model.")
    qdrant_url: str | None = Field(None, description="Qdrant server URL; None: local mode in the output folder.")
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


@dataclass(frozen=True)
class PreparedDocument:
    """A document's id and retrieval chunks; its completeness chunks are cut on first use, so
    indexing alone never pays for them."""

    context: str = field(repr=False)
    config: ScoringConfig = field(repr=False)
    doc_id: str
    chunking: str  # identifies tokenizer + chunk size, so indexes of other settings never mix
    retrieval_chunks: list[ChunkSpan]

    @cached_property
    def completeness_chunks(self) -> list[ChunkSpan]:
        return chunk_document(self.context, load_tokenizer(self.config.tokenizer), self.config.completeness_chunk_tokens)

    def index_into(self, index: ChunkIndex) -> None:
        """Store the retrieval chunks in `index` (idempotent: ids are content hashes)."""
        index.index_document(self.doc_id, self.chunking, self.retrieval_chunks)

    def evidence(self, chunk_indices: list[int]) -> str:
        """Chunks in document order; adjacent ones joined as they are, gaps marked."""
        parts: list[str] = []
        previous = None
        for i in chunk_indices:
            if previous is not None and i != previous + 1:
                parts.append("\n[...]\n")
            parts.append(self.retrieval_chunks[i].text)
            previous = i
        return "".join(parts)


def retrieval_chunking(config: ScoringConfig) -> str:
    """Names the tokenizer and chunk size, so indexes of other settings never mix."""
    return f"{config.tokenizer or 'embedded'}:{config.retrieval_chunk_tokens}"


def prepare_document(context: str, config: ScoringConfig) -> PreparedDocument:
    """A document's id (content hash) and its retrieval chunks (completeness chunks on demand)."""
    return PreparedDocument(
        context=context,
        config=config,
        doc_id=content_hash(context),
        chunking=retrieval_chunking(config),
        retrieval_chunks=chunk_document(context, load_tokenizer(config.tokenizer), config.retrieval_chunk_tokens),
    )


def open_chunk_index(
    config: ScoringConfig, path: str | Path | None, *, cache: CallStore | None = None,
    accounting: RunAccounting | None = None,
) -> ChunkIndex:
    """The chunk index `config` names: its Qdrant server, else local mode in the folder `path`
    (a litellm embedding model's requests cached in `cache` and counted in `accounting`)."""
    return ChunkIndex(
        make_embedder(config.embedding_model, config.embedding_api_base, cache=cache, accounting=accounting),
        path=None if config.qdrant_url else path,
        url=config.qdrant_url,
    )


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
        finally:  # a failure (refused credentials) or a closed generator stops the other prompts
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _score_prompt(
        self, prompt: Prompt, candidates: list[Candidate], on_scored: Callable[[CandidateScore], None] | None
    ) -> list[CandidateScore]:
        language = detect_language(prompt.query + "\n" + prompt.context)
        doc = await asyncio.to_thread(self.prepare, prompt.context)
        # Indexing (CPU) overlaps the first round of judge calls, which do not need it.
        indexed = asyncio.ensure_future(
            asyncio.to_thread(doc.index_into, self.index)
        )
        key_points = asyncio.ensure_future(
            completeness.extract_key_points(self.judge, language, prompt.query, doc.completeness_chunks)
        )

        async def retrieve(statements: list[str]) -> list[str]:
            await indexed
            hits = await asyncio.to_thread(self.index.query, doc.doc_id, doc.chunking, statements, self.config.top_k)
            return [doc.evidence(h) for h in hits]

        checks = faithfulness.SupportChecks(self.judge, retrieve, language)
        if self.config.prune:
            try:
                return await self._score_pruned(prompt, candidates, language, key_points, checks, on_scored)
            finally:
                for task in (indexed, key_points):
                    if not task.done():
                        task.cancel()
                await asyncio.gather(indexed, key_points, checks.close(), return_exceptions=True)

        async def completeness_of(response: str) -> float:
            try:
                points = await key_points
            except LLMCallFailed as exc:
                raise type(exc)(f"key-point extraction failed: {exc}", transport=exc.transport) from None
            return await completeness.score_completeness(self.judge, language, prompt.query, points, response)

        async def one_candidate(c: Candidate) -> CandidateScore:
            q, r = prompt.query, c.response
            results = await asyncio.gather(
                _as_result(helpfulness.score_helpfulness(self.judge, language, q, r)),
                _as_result(logicality.score_logicality(self.judge, language, q, r)),
                _as_result(faithfulness.score_faithfulness(self.judge, checks, language, q, r)),
                _as_result(completeness_of(r)),
            )
            score = CandidateScore(
                prompt_id=prompt.id,
                candidate_id=c.candidate_id,
                language=language,
                helpfulness=results[0],
                logicality=results[1],
                faithfulness=results[2],
                completeness=results[3],
            )
            if on_scored is not None:
                on_scored(score)
            return score

        try:
            return await asyncio.gather(*(one_candidate(c) for c in candidates))
        finally:
            for task in (indexed, key_points):
                if not task.done():
                    task.cancel()
            # Retrieve exceptions of shared tasks nobody awaited (e.g. every candidate failed early).
            await asyncio.gather(indexed, key_points, checks.close(), return_exceptions=True)

    async def _score_pruned(
        self, prompt: Prompt, candidates: list[Candidate], language: str, key_points: asyncio.Future[str],
        checks: faithfulness.SupportChecks, on_scored: Callable[[CandidateScore], None] | None,
    ) -> list[CandidateScore]:
        """Pair pruning (`reward.pruning`): every dimension but the support checks for every
        candidate, then only the support checks that can still change the prompt's pair."""
        q = prompt.query

        async def completeness_of(response: str) -> float:
            try:
                points = await key_points
            except LLMCallFailed as exc:
                raise type(exc)(f"key-point extraction failed: {exc}", transport=exc.transport) from None
            return await completeness.score_completeness(self.judge, language, q, points, response)

        async def statements_of(response: str) -> tuple[DimensionResult, list[str]]:
            found = await faithfulness.extract_statements(self.judge, language, q, response)
            return DimensionResult(score=10.0 if not found else None, statements=len(found)), found

        async def first_wave(c: Candidate) -> tuple[list[DimensionResult], tuple[DimensionResult, list[str] | None]]:
            r = c.response
            results = await asyncio.gather(
                _as_result(helpfulness.score_helpfulness(self.judge, language, q, r)),
                _as_result(logicality.score_logicality(self.judge, language, q, r)),
                _as_result(completeness_of(r)),
                _statements_result(statements_of(r)),
            )
            return list(results[:3]), results[3]

        waves = await asyncio.gather(*(first_wave(c) for c in candidates))
        race = PairRace([c.candidate_id for c in candidates], self.pairs)
        statements: dict[str, list[str]] = {}
        faith: dict[str, DimensionResult] = {}
        for c, (cheap, (extracted, found)) in zip(candidates, waves, strict=True):
            contestant = race[c.candidate_id]
            for name, result in zip(("helpfulness", "logicality", "completeness"), cheap, strict=True):
                contestant.scores[name] = result.score
                contestant.failed |= not result.ok
            faith[c.candidate_id] = extracted
            if extracted.error is not None:
                contestant.failed = True
            elif found is not None:
                contestant.statements = len(found)
                if not found:
                    contestant.scores["faithfulness"] = 10.0
                elif not contestant.failed:
                    statements[c.candidate_id] = found
        outcome = await check_support_pruned(race, statements, checks)
        self.pruning.support_checks_saved += outcome.checks_saved
        scores = []
        for c, (cheap, _) in zip(candidates, waves, strict=True):
            contestant = race[c.candidate_id]
            f = faith[c.candidate_id]
            if c.candidate_id in outcome.failures:
                f = await _as_result(_raise(outcome.failures[c.candidate_id]))
                f.statements = contestant.statements
            elif contestant.scores["faithfulness"] is not None:
                f = DimensionResult(score=contestant.scores["faithfulness"], statements=contestant.statements)
            pruned = contestant.open
            low, high = contestant.bounds if pruned else (None, None)
            score = CandidateScore(
                prompt_id=prompt.id, candidate_id=c.candidate_id, language=language,
                helpfulness=cheap[0], logicality=cheap[1], faithfulness=f, completeness=cheap[2],
                pruned=pruned, reward_low=low, reward_high=high,
            )
            self.pruning.pruned += pruned
            if on_scored is not None:
                on_scored(score)
            scores.append(score)
        return scores

    def close(self) -> None:
        self.index.close()


@dataclass
class PruningStats:
    """What pair pruning left out over a run."""

    pruned: int = 0  # candidates left unscored
    support_checks_saved: int = 0  # distinct statements never graded


async def _raise(exc: Exception) -> float:
    raise exc


async def _statements_result(work: Awaitable[tuple[DimensionResult, list[str]]]) -> tuple[DimensionResult, list[str] | None]:
    """The statement extraction's outcome: (a partial faithfulness result, the statements), or
    (its failure, None). Refused credentials escape, as in `_as_result`."""
    found: list[list[str]] = []

    async def extraction() -> DimensionResult:
        result, statements = await work
        found.append(statements)
        return result

    result = await _as_result(extraction())
    if result.error is not None:
        return result, None
    return result, found[0]


async def _as_result(work: Awaitable[float | DimensionResult]) -> DimensionResult:
    """A dimension's outcome: its score, or its failure with the reason. Only refused credentials
    escape as an exception: they end the run, since every other request would fail alike."""
    try:
        value = await work
    except ConfigurationError:
        raise
    except Exception as exc:
        if isinstance(exc, LLMCallFailed):
            return DimensionResult(error=str(exc), transport=exc.transport, rejected=isinstance(exc, RequestRejected))
        return DimensionResult(error=redact(f"{type(exc).__name__}: {exc}"))
    if isinstance(value, DimensionResult):
        return value
    return DimensionResult(score=float(value))

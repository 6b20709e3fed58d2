"""Faithfulness: the share of the response's factual statements that the document supports.

1. One call extracts the response's factual statements (the judge does not see the document);
   prompt files faithfulness_statements.{en,zh}.txt.
2. Each distinct statement retrieves its top-k retrieval chunks, put back in document order.
3. One call per distinct statement grades support (faithfulness_support.{en,zh}.txt):
   Fully supported = 1, Partially supported = 0.5, No support = 0. A statement that several
   candidates of a prompt make word for word is retrieved and graded once (`SupportChecks`).
Score = 10 x mean support.

A response with no factual statement (a refusal, a purely functional reply) scores 10: it asserts
nothing the document contradicts. Its statement count (0) is recorded, so such candidates can be
told apart; helpfulness and completeness are where an empty answer loses.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from longreward_core.data.records import DimensionResult
from longreward_core.reward.judge import Judge
from longreward_core.reward.prompts import render
from longreward_core.reward.verdicts import (
    VerdictFormat,
    VerdictParseError,
    parse_marked_list,
)

DIMENSION = "faithfulness"

SUPPORT_VALUES = {"fully supported": 1.0, "partially supported": 0.5, "no support": 0.0}
_SUPPORT = re.compile(r"\[\[\s*(fully supported|partially supported|no support)\s*\]\]", re.I)

# Evidence retriever: statements -> one evidence text per statement.
Retriever = Callable[[list[str]], Awaitable[list[str]]]


def parse_statements(text: str) -> list[str]:
    return parse_marked_list(text, open_marker="[[statements]]", none_marker="[[no statements]]")


def parse_support(text: str) -> float:
    """The last support label in the answer, as 1 / 0.5 / 0."""
    matches = _SUPPORT.findall(text)
    if not matches:
        raise VerdictParseError("no '[[Fully supported]]' / '[[Partially supported]]' / '[[No support]]' verdict")
    return SUPPORT_VALUES[matches[-1].lower()]


STATEMENTS = VerdictFormat(parse=parse_statements, prefix="[[statements]]\n- ", none="[[no statements]]")
SUPPORT = VerdictFormat(
    parse=parse_support, prefix="[[", choices=("Fully supported", "Partially supported", "No support"), suffix="]]"
)


def statement_key(statement: str) -> str:
    """What makes two statements the same: case, spacing and final punctuation are ignored."""
    return re.sub(r"\s+", " ", statement).strip().rstrip(".。!！").casefold()


def distinct(statements: list[str]) -> list[str]:
    """Statements with duplicates removed (see `statement_key`), in order."""
    seen: set[str] = set()
    out = []
    for s in statements:
        key = statement_key(s)
        if key and key not in seen:
            seen.add(key)
            out.append(s)
    return out


class SupportChecks:
    """The support verdicts of one prompt's statements, shared by all its candidates.

    A statement that several candidates make word for word is retrieved and graded once: every
    candidate gets the same verdict, and the judge is asked one question instead of several. Only
    identical text is shared: the question sent for a statement never depends on which candidate
    asked first, so a re-run reproduces every verdict from the call cache.
    """

    def __init__(self, judge: Judge, retrieve: Retriever, language: str):
        self._judge = judge
        self._retrieve = retrieve
        self._language = language
        self._checks: dict[str, asyncio.Future[float]] = {}

    async def supports(self, statements: list[str]) -> list[float]:
        """1 / 0.5 / 0 per statement (raises LLMCallFailed when a verdict cannot be had)."""
        return list(await asyncio.gather(*self.start(statements)))

    def start(self, statements: list[str]) -> list[asyncio.Future[float]]:
        """The checks of `statements`, started where new (their evidence retrieved in one batch)."""
        fresh = list(dict.fromkeys(s for s in statements if s not in self._checks))
        if fresh:
            # Registered before any await, so a candidate arriving meanwhile waits for these.
            evidence = asyncio.ensure_future(self._retrieve(fresh))
            for i, statement in enumerate(fresh):
                self._checks[statement] = asyncio.ensure_future(self._grade(statement, evidence, i))
        return [self._checks[s] for s in statements]

    async def _grade(self, statement: str, evidence: asyncio.Future[list[str]], index: int) -> float:
        excerpts = (await evidence)[index]
        messages = render("faithfulness_support", self._language, evidence=excerpts, statement=statement)
        return await self._judge.verdict(DIMENSION, messages, SUPPORT)

    async def close(self) -> None:
        """Stop checks nobody waits for any more (their candidates already failed)."""
        for check in self._checks.values():
            check.cancel()
        await asyncio.gather(*self._checks.values(), return_exceptions=True)


async def extract_statements(judge: Judge, language: str, question: str, response: str) -> list[str]:
    """The response's distinct factual statements (one judge call)."""
    messages = render("faithfulness_statements", language, question=question, response=response)
    return distinct(await judge.verdict(DIMENSION, messages, STATEMENTS))


async def score_faithfulness(
    judge: Judge, checks: SupportChecks, language: str, question: str, response: str
) -> DimensionResult:
    """Faithfulness 0-10 with the number of statements judged; raises LLMCallFailed on failure."""
    statements = await extract_statements(judge, language, question, response)
    if not statements:
        return DimensionResult(score=10.0, statements=0)
    supports = await checks.supports(statements)
    return DimensionResult(score=10.0 * sum(supports) / len(supports), statements=len(statements))

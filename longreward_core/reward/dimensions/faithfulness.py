"""Faithfulness: the share of the response's factual statements that the document supports.

1. One call extracts the response's factual statements (the judge does not see the document);
   prompt files faithfulness_statements.{en,zh}.txt.
2. Each distinct statement retrieves its top-k retrieval chunks, put back in document order.
3. One call per distinct statement grades support (faithfulness_support.{en,zh}.txt):
   Fully supported = 1, Partially supported = 0.5, No support = 0. A statement that several
   candidates of a prompt make word for word is retrieved and graded once (a shared `Step`).
Score = 10 x mean support.

A response with no factual statement (a refusal, a purely functional reply) scores 10: it asserts
nothing the document contradicts. Its statement count (0) is recorded, so such candidates can be
told apart; helpfulness and completeness are where an empty answer loses.
"""

from __future__ import annotations

import re

from longreward_core.data.records import DimensionResult
from longreward_core.reward.prompts import render
from longreward_core.reward.steps import Ask, Evidence, Plan, PromptInputs, Step
from longreward_core.reward.verdicts import (
    VerdictFormat,
    VerdictParseError,
    parse_marked_list,
)

DIMENSION = "faithfulness"

SUPPORT_VALUES = {"fully supported": 1.0, "partially supported": 0.5, "no support": 0.0}
_SUPPORT = re.compile(r"\[\[\s*(fully supported|partially supported|no support)\s*\]\]", re.I)

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


def check_support(prompt: PromptInputs, statement: str) -> Plan[float]:
    """1 / 0.5 / 0: how far the statement's retrieved excerpts support it (one judge call).

    A statement that several candidates make word for word is one step of the prompt: it is
    retrieved and graded once, and the question sent never depends on which candidate asked
    first, so a re-run reproduces every verdict from the call cache."""
    (excerpts,) = yield [Evidence(statement)]
    messages = render("faithfulness_support", prompt.language, evidence=excerpts, statement=statement)
    (support,) = yield [Ask(DIMENSION, messages, SUPPORT)]
    return support


def support_check(statement: str) -> Step:
    """The prompt's support check of `statement`."""
    return Step(check_support, (statement,))


def plan(prompt: PromptInputs, response: str) -> Plan[DimensionResult]:
    """Faithfulness 0-10 with the number of distinct statements judged."""
    messages = render("faithfulness_statements", prompt.language, question=prompt.question, response=response)
    (found,) = yield [Ask(DIMENSION, messages, STATEMENTS)]
    statements = distinct(found)
    if not statements:
        return DimensionResult(score=10.0, statements=0)
    supports = yield [support_check(s) for s in statements]
    return DimensionResult(score=10.0 * sum(supports) / len(supports), statements=len(statements))

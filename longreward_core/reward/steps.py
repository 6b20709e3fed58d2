"""What a dimension's plan waits for, and the shape of a plan.

A plan is a generator: it yields the list of needs it waits for and receives their answers, in the
same order, as the value of the `yield`; it returns its result. A need that fails (a judge call
that gives up, a retrieval that raises) is raised at the `yield`, so a plan that does not catch it
fails with it. Plans never send anything themselves: an executor answers their needs (the online
scorer by asking the judge, a batch executor from the answers of a submitted batch), which is what
lets every executor run the same plans.

- `Ask`: one logical judge call (its attempts, hotter after an unparsed answer: `reward.judge`).
- `Evidence`: a statement's document excerpts, retrieved from the prompt's chunk index.
- `Step`: a plan of the prompt shared by its candidates (the completeness key points, one support
  check per distinct statement): equal steps run once per prompt, and every waiter gets the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from longreward_core.data.records import Prompt
from longreward_core.reward.chunking import ChunkSpan
from longreward_core.reward.prompts import detect_language
from longreward_core.reward.verdicts import VerdictFormat

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Ask:
    """One logical judge call: `messages` answered by a verdict in the `verdict` format, accounted
    to `dimension`. Each yielded Ask is its own need (identity, not equality)."""

    dimension: str
    messages: list[dict[str, str]]
    verdict: VerdictFormat[Any]


@dataclass(frozen=True, eq=False)
class Evidence:
    """The document excerpts retrieved for `statement` (answered by the chunk index, not the judge)."""

    statement: str


@dataclass(frozen=True)
class PromptInputs:
    """What the plans of one prompt read: its language, question and completeness chunks."""

    language: str
    question: str
    completeness_chunks: list[ChunkSpan]

    @classmethod
    def of(cls, prompt: Prompt, completeness_chunks: list[ChunkSpan]) -> PromptInputs:
        """The inputs of `prompt`, its language told from question and document."""
        return cls(detect_language(prompt.query + "\n" + prompt.context), prompt.query, completeness_chunks)


@dataclass(frozen=True)
class Step:
    """A prompt-level plan, `plan(prompt, *args)`, shared by every candidate that waits for it."""

    plan: Callable[..., Plan[Any]]
    args: tuple[str, ...] = ()


Need = Union[Ask, Evidence, Step]
Plan = Generator[list[Need], list[Any], T]

"""Completeness: does the response cover the question-relevant key points of the whole document?

Divide and conquer. Once per prompt (it depends only on document and question), one call per
coarse chunk extracts the question-relevant information (completeness_extract.*.txt, beside this file);
the results are labelled by position ("0%-25% of the document: ..."). Then one call per candidate
grades the response against them (completeness_judge.*.txt, beside this file), verdict `[[0-10]]`.
"""

from __future__ import annotations

from longreward_core.models.errors import LLMCallFailed
from longreward_core.reward.prompts import render
from longreward_core.reward.steps import Ask, Plan, PromptInputs, Step
from longreward_core.reward.verdicts import RATING, VerdictFormat, parse_marked_list

DIMENSION = "completeness"

NO_KEY_POINTS = {
    "en": "(No part of the document holds information relevant to the question.)",
    "zh": "（文档中没有与问题相关的信息。）",
}


_POSITION = {"en": "{label} of the document:", "zh": "文档的 {label}："}


def parse_information(text: str) -> list[str]:
    return parse_marked_list(text, open_marker="[[information]]", none_marker="[[none]]")


INFORMATION = VerdictFormat(parse=parse_information, prefix="[[information]]\n- ", none="[[none]]")


def extract_key_points(prompt: PromptInputs) -> Plan[str]:
    """The question-relevant information of every chunk, labelled by position (one call per chunk)."""
    chunks = prompt.completeness_chunks
    per_chunk = yield [
        Ask(DIMENSION, render("completeness_extract", prompt.language, question=prompt.question, chunk=c.text), INFORMATION)
        for c in chunks
    ]
    sections = [
        _POSITION[prompt.language].format(label=c.position_label) + "\n" + "\n".join(f"- {p}" for p in points)
        for c, points in zip(chunks, per_chunk, strict=True)
        if points
    ]
    return "\n\n".join(sections) or NO_KEY_POINTS[prompt.language]


# Once per prompt, shared by its candidates: started with the prompt (see `reward.plan`).
KEY_POINTS = Step(extract_key_points)


def plan(prompt: PromptInputs, response: str) -> Plan[float]:
    """Score 0-10 against the prompt's key points (`KEY_POINTS`); their failure fails this dimension."""
    try:
        (key_points,) = yield [KEY_POINTS]
    except LLMCallFailed as exc:
        raise type(exc)(f"key-point extraction failed: {exc}", transport=exc.transport) from None
    messages = render("completeness_judge", prompt.language, question=prompt.question, key_points=key_points, response=response)
    (score,) = yield [Ask(DIMENSION, messages, RATING)]
    return score

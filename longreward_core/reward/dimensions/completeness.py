"""Completeness: does the response cover the question-relevant key points of the whole document?

Divide and conquer. Once per prompt (it depends only on document and question), one call per
coarse chunk extracts the question-relevant information (completeness_extract.*.txt, beside this file);
the results are labelled by position ("0%-25% of the document: ..."). Then one call per candidate
grades the response against them (completeness_judge.*.txt, beside this file), verdict `[[0-10]]`.
"""

from __future__ import annotations

import asyncio

from longreward_core.reward.chunking import ChunkSpan
from longreward_core.reward.judge import Judge
from longreward_core.reward.prompts import render
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


async def extract_key_points(judge: Judge, language: str, question: str, chunks: list[ChunkSpan]) -> str:
    """The question-relevant information of every chunk, labelled by position (one call per chunk)."""
    per_chunk = await asyncio.gather(
        *(
            judge.verdict(DIMENSION, render("completeness_extract", language, question=question, chunk=c.text), INFORMATION)
            for c in chunks
        )
    )
    sections = [
        _POSITION[language].format(label=c.position_label) + "\n" + "\n".join(f"- {p}" for p in points)
        for c, points in zip(chunks, per_chunk, strict=True)
        if points
    ]
    return "\n\n".join(sections) or NO_KEY_POINTS[language]


async def score_completeness(judge: Judge, language: str, question: str, key_points: str, response: str) -> float:
    """Score 0-10 against the extracted key points; raises LLMCallFailed on failure."""
    messages = render("completeness_judge", language, question=question, key_points=key_points, response=response)
    return await judge.verdict(DIMENSION, messages, RATING)

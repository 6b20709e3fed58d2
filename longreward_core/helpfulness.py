"""Helpfulness: does the response serve the question? Judged from question and response only.

Prompt files: prompts/helpfulness.{en,zh}.txt. One judge call per candidate; verdict `[[0-10]]`.
"""

from __future__ import annotations

from longreward_core.judge import RATING, JudgeClient
from longreward_core.prompts import render

DIMENSION = "helpfulness"


async def score_helpfulness(judge: JudgeClient, language: str, question: str, response: str) -> float:
    """Score 0-10; raises JudgeCallFailed when the judge gives no verdict."""
    messages = render("helpfulness", language, question=question, response=response)
    return await judge.judge(DIMENSION, messages, RATING)

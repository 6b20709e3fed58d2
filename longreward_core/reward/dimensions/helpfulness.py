"""Helpfulness: does the response serve the question? Judged from question and response only.

Prompt files (beside this one): helpfulness.{en,zh}.txt. One judge call per candidate; verdict `[[0-10]]`.
"""

from __future__ import annotations

from longreward_core.reward.judge import Judge
from longreward_core.reward.prompts import render
from longreward_core.reward.verdicts import RATING

DIMENSION = "helpfulness"


async def score_helpfulness(judge: Judge, language: str, question: str, response: str) -> float:
    """Score 0-10; raises LLMCallFailed when the judge gives no verdict."""
    messages = render("helpfulness", language, question=question, response=response)
    return await judge.verdict(DIMENSION, messages, RATING)

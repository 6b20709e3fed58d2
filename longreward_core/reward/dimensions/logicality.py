"""Logicality: is the response internally consistent and its reasoning and arithmetic right?

Judged from question and response only; the judge is told not to use outside knowledge.
Prompt files (beside this one): logicality.{en,zh}.txt. One judge call per candidate; verdict `[[0-10]]`.
"""

from __future__ import annotations

from longreward_core.reward.judge import Judge
from longreward_core.reward.prompts import render
from longreward_core.reward.verdicts import RATING

DIMENSION = "logicality"


async def score_logicality(judge: Judge, language: str, question: str, response: str) -> float:
    """Score 0-10; raises LLMCallFailed when the judge gives no verdict."""
    messages = render("logicality", language, question=question, response=response)
    return await judge.verdict(DIMENSION, messages, RATING)

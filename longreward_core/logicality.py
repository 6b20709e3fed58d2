"""Logicality: is the response internally consistent and its reasoning and arithmetic right?

Judged from question and response only; the judge is told not to use outside knowledge.
Prompt files: prompts/logicality.{en,zh}.txt. One judge call per candidate; verdict `[[0-10]]`.
"""

from __future__ import annotations

from longreward_core.judge import RATING, JudgeClient
from longreward_core.prompts import render

DIMENSION = "logicality"


async def score_logicality(judge: JudgeClient, language: str, question: str, response: str) -> float:
    """Score 0-10; raises JudgeCallFailed when the judge gives no verdict."""
    messages = render("logicality", language, question=question, response=response)
    return await judge.judge(DIMENSION, messages, RATING)

"""Logicality: is the response internally consistent and its reasoning and arithmetic right?

Judged from question and response only; the judge is told not to use outside knowledge.
Prompt files (beside this one): logicality.{en,zh}.txt. One judge call per candidate; verdict `[[0-10]]`.
"""

from __future__ import annotations

from longreward_core.reward.prompts import render
from longreward_core.reward.steps import Ask, Plan, PromptInputs
from longreward_core.reward.verdicts import RATING

DIMENSION = "logicality"


def plan(prompt: PromptInputs, response: str) -> Plan[float]:
    """Score 0-10: one judge call."""
    messages = render("logicality", prompt.language, question=prompt.question, response=response)
    (score,) = yield [Ask(DIMENSION, messages, RATING)]
    return score

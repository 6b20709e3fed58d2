"""Helpfulness: does the response serve the question? Judged from question and response only.

Prompt files (beside this one): helpfulness.{en,zh}.txt. One judge call per candidate; verdict `[[0-10]]`.
"""

from __future__ import annotations

from longreward_core.reward.prompts import render
from longreward_core.reward.steps import Ask, Plan, PromptInputs
from longreward_core.reward.verdicts import RATING

DIMENSION = "helpfulness"


def plan(prompt: PromptInputs, response: str) -> Plan[float]:
    """Score 0-10: one judge call."""
    messages = render("helpfulness", prompt.language, question=prompt.question, response=response)
    (score,) = yield [Ask(DIMENSION, messages, RATING)]
    return score

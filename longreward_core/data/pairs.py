"""Preference pairs from scored candidates: chosen = highest reward, rejected = lowest.

A prompt yields a pair only with at least `min_candidates` scored candidates (failed ones do not
count) and a reward margin above `min_margin`. Ties are broken deterministically: among equal
rewards the smallest candidate_id is chosen and the largest is rejected. Output rows follow TRL's
conversational preference format (records.PAIRS_SCHEMA).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from longreward_core.data.form import form_order
from longreward_core.data.records import PAIRS_SCHEMA, Candidate, PreferencePair, Prompt


class PairConfig(BaseModel):
    """Rules for turning scored candidates into preference pairs."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    min_candidates: int = Field(5, ge=2, description="Scored candidates a prompt needs to yield a pair.")
    min_margin: float = Field(0.0, ge=0, description="Chosen reward minus rejected reward must exceed this.")


def user_message(prompt: Prompt) -> str:
    """The policy's view of a prompt: the document, then the question."""
    return f"{prompt.context}\n\n{prompt.query}"


@dataclass
class PairsResult:
    pairs: list[PreferencePair]
    skipped: Counter = field(default_factory=Counter)  # reason -> prompts

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame([p.to_row() for p in self.pairs], schema=PAIRS_SCHEMA)


def build_pairs(
    scores: pl.DataFrame, prompts: list[Prompt], candidates: list[Candidate], config: PairConfig
) -> PairsResult:
    """Pairs for every prompt that qualifies; `skipped` counts the prompts that did not, by reason."""
    responses = {c.candidate_id: c.response for c in candidates}
    scored: dict[str, list[tuple[str, float]]] = defaultdict(list)
    rows = scores.filter(pl.col("reward").is_not_null()).unique("candidate_id", keep="first", maintain_order=True)
    for row in rows.iter_rows(named=True):
        if row["candidate_id"] in responses:
            scored[row["prompt_id"]].append((row["candidate_id"], row["reward"]))
    result = PairsResult(pairs=[])
    for prompt in prompts:
        group = scored.get(prompt.id, [])
        if len(group) < config.min_candidates:
            result.skipped[f"fewer than {config.min_candidates} scored candidates"] += 1
            continue
        chosen_id, chosen_reward = min(group, key=lambda g: (-g[1], g[0]))
        rejected_id, rejected_reward = max(group, key=lambda g: (-g[1], g[0]))
        if chosen_reward - rejected_reward <= config.min_margin:
            result.skipped[f"reward margin not above {config.min_margin}"] += 1
            continue
        result.pairs.append(
            PreferencePair(
                prompt_id=prompt.id,
                prompt=[{"role": "user", "content": user_message(prompt)}],
                chosen=[{"role": "assistant", "content": responses[chosen_id]}],
                rejected=[{"role": "assistant", "content": responses[rejected_id]}],
                chosen_id=chosen_id,
                rejected_id=rejected_id,
                chosen_reward=chosen_reward,
                rejected_reward=rejected_reward,
            )
        )
    return result

"""A judge config aimed at the double, and the mill prompts whose candidates' rewards are known."""

from __future__ import annotations

import json
from pathlib import Path

from longreward_core.reward.judge import JudgeConfig
from longreward_testing.judge_double import JudgeServer

TEST_API_KEY = "sk-test-not-a-real-key-7f3a9c"
TOPICS = ["ALDER", "BIRCH", "CEDAR", "DAMSON", "ELM"]


def judge_config_for(server: JudgeServer, **overrides) -> JudgeConfig:
    """A judge config aimed at the double, with fast backoff so fault tests stay quick."""
    settings = dict(
        model="openai/judge-double",
        api_base=server.api_base,
        api_key=TEST_API_KEY,
        timeout_s=5.0,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        concurrency=8,
    )
    settings.update(overrides)
    return JudgeConfig(**settings)


def write_inputs(tmp_path: Path, n_prompts: int = 5, n_candidates: int = 5) -> tuple[Path, Path]:
    """prompts.jsonl and candidates.jsonl in `tmp_path`: one prompt per mill of TOPICS, candidate k
    answering with the document's first 5 - k sentences."""
    prompts, candidates = [], []
    for p, topic in enumerate(TOPICS[:n_prompts]):
        sentences = [f"The {topic} mill closed in {1960 + p} after a fire.", f"The {topic} mill opened in {1900 + p}.",
                     f"It ground wheat for {p + 2} villages.", f"The {topic} mill had a water wheel.",
                     f"Its last miller was called Orrin {topic.title()}."]
        context = " ".join(sentences * 4)
        prompts.append({"id": f"p{p}", "context": context, "query": f"When did the {topic} mill close?"})
        for k in range(n_candidates):
            # Every sentence is in the document; with a helpfulness script that rates 2 x the
            # sentences (tests/test_flow.py), candidate k is rated 2 x (5 - k): -0 is the best, -4 the worst.
            candidates.append({"prompt_id": f"p{p}", "candidate_id": f"p{p}-{k}", "response": " ".join(sentences[: 5 - k])})
    prompts_path, candidates_path = tmp_path / "prompts.jsonl", tmp_path / "candidates.jsonl"
    prompts_path.write_text("".join(json.dumps(r) + "\n" for r in prompts))
    candidates_path.write_text("".join(json.dumps(r) + "\n" for r in candidates))
    return prompts_path, candidates_path

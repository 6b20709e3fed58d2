"""`longreward score` and `longreward build` against a real OpenAI-compatible server with no key:
`transformers serve` with the embedded SmolLM2-135M-Instruct checkpoint, on loopback.

The commands run as a user runs them (the installed `longreward` script, in a subprocess). A
recording proxy in front of the server keeps the status and usage of each of its answers, so the
accounting is compared with what the server itself reported. The server generates on the CPU, one
request at a time: documents are a few sentences and answers a few tokens. Its `--max-model-len`
is small, so a candidate of a few thousand tokens is refused (HTTP 400) by the real server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from longreward_core.models.smollm2 import embedded_checkpoint
from tests.real_server import RecordingProxy, transformers_serve

MAX_MODEL_LEN = 2048  # the judge prompts' instructions and examples take about 900 tokens
ANSWER_TOKENS = 16  # the smallest completion budget the judge takes: a rating verdict fits in it
LONGREWARD = str(Path(sys.executable).parent / "longreward")

DOCUMENTS = [
    {"id": "bridge", "query": "When did the Harbor Street bridge reopen?",
     "context": "The Harbor Street bridge closed in March 2021 for repairs. It reopened in August 2021 after the "
                "city replaced its steel deck. The repairs cost 1.2 million dollars."},
    {"id": "library", "query": "How many books does the Elm Park library hold?",
     "context": "The Elm Park library opened in 1962. It holds 48,000 books and lends about 300 of them each day."},
]


@dataclass
class Served:
    model: str  # the litellm model string: `transformers serve` names the model by its path
    proxy: RecordingProxy
    log: Path

    def access_log(self, start: int) -> list[str]:
        """The server's access-log lines for chat completions written after byte `start` of its log."""
        with self.log.open("rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace")
        return [line for line in text.splitlines() if '"POST /v1/chat/completions HTTP/1.1"' in line]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = embedded_checkpoint()
    log = tmp_path_factory.mktemp("transformers-serve") / "server.log"
    with transformers_serve(model_dir, log, MAX_MODEL_LEN) as api_base, RecordingProxy(api_base) as proxy:
        yield Served(model=f"openai/{model_dir}", proxy=proxy, log=log)


@pytest.fixture
def keyless(monkeypatch, served):
    """No API key anywhere in the environment the commands inherit."""
    for name in list(os.environ):
        if name.endswith("_API_KEY"):
            monkeypatch.delenv(name)
    served.proxy.clear()
    return served.log.stat().st_size


def _longreward(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([LONGREWARD, *args], capture_output=True, text=True, timeout=540)
    print(result.stdout, result.stderr)
    return result


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _usage_sum(exchanges, key: str) -> int:
    return sum(e.usage[key] for e in exchanges)


def test_score_against_transformers_serve(served, keyless, tmp_path):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", DOCUMENTS[:1])
    over_limit = "The bridge reopened in August 2021 after its steel deck was replaced. " * 160
    candidates = _write_jsonl(tmp_path / "candidates.jsonl", [
        {"prompt_id": "bridge", "candidate_id": "short", "response": "It reopened in August 2021."},
        {"prompt_id": "bridge", "candidate_id": "over-limit", "response": over_limit},
    ])
    out = tmp_path / "out"
    result = _longreward("score", "--prompts", str(prompts), "--candidates", str(candidates), "--out", str(out),
                         "--judge-model", served.model, "--judge-api-base", served.proxy.api_base,
                         "--judge-max-tokens", str(ANSWER_TOKENS), "--judge-max-attempts", "1")

    scores = {row["candidate_id"]: row for row in pl.read_parquet(out / "scores.parquet").to_dicts()}
    assert set(scores) == {"short", "over-limit"}
    scored = [c for c, row in scores.items() if row["status"] == "scored"]
    # A 135M judge often writes no verdict in the asked form: the command then says that nothing was scored.
    assert result.returncode == (0 if scored else 1), result.stdout + result.stderr

    # The server refused the long candidate's requests, and only those: the row failed with the refusal.
    long_row = scores["over-limit"]
    assert long_row["status"] == "failed" and long_row["reward"] is None
    for dimension in ("helpfulness", "logicality", "faithfulness"):  # the prompts that carry the response
        assert re.search(rf"{dimension}: \S+ rejected the request \(HTTP 400\)", long_row["error"]), long_row["error"]
    short = scores["short"]
    if short["status"] != "scored":
        # Every dimension the short candidate lacks failed for want of a verdict in the server's answers.
        failed = re.findall(r"(?:^|; )(helpfulness|logicality|faithfulness|completeness): ", short["error"])
        assert failed and short["error"].count("no parseable verdict") == len(failed), short["error"]
    assert "HTTP" not in (short["error"] or "")

    # Every request reached the server; the accounting holds the usage the server reported.
    answered, refused = served.proxy.posts(200), served.proxy.posts(400)
    assert len(answered) + len(refused) == len(served.proxy.posts())
    access = served.access_log(keyless)
    assert sum(" 200 " in line for line in access) == len(answered) > 0
    assert sum(" 400 " in line for line in access) == len(refused) >= 3
    total = json.loads((out / "accounting.json").read_text())["judge"]["total"]
    assert total["calls"] == len(answered) and total["rejected"] == len(refused)
    assert total["prompt_tokens"] == _usage_sum(answered, "prompt_tokens") > 0
    assert total["completion_tokens"] == _usage_sum(answered, "completion_tokens") > 0
    assert all(e.usage["completion_tokens"] <= ANSWER_TOKENS for e in answered)


def test_build_samples_from_transformers_serve(served, keyless, judge_server, prefect_harness, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    # The build reports to the session's Prefect server instead of starting a temporary one.
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", DOCUMENTS)
    out = tmp_path / "builds"
    result = _longreward("build", "--prompts", str(prompts), "--out", str(out), "--run-date", "2026-01-15",
                         "--policy-model", served.model, "--policy-api-base", served.proxy.api_base,
                         "--policy-max-context-tokens", str(MAX_MODEL_LEN),  # the server does not report it
                         "--candidates-per-prompt", "2", "--max-new-tokens", str(ANSWER_TOKENS), "--min-candidates", "2",
                         "--judge-model", "openai/judge-double", "--judge-api-base", judge_server.api_base)
    assert result.returncode == 0, result.stdout + result.stderr

    build = out / "2026-01-15"
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["counts"]["candidates"] == 4 and manifest["counts"]["scored"] == 4
    # Two candidates of equal reward make no pair: each prompt has its pair or the reason why not.
    assert manifest["counts"]["pairs"] + sum(manifest["counts"]["prompts_without_pair"].values()) == 2
    [shard] = sorted((build / "shards").iterdir())
    candidates = pl.read_parquet(shard / "candidates.parquet")
    assert candidates.height == 4 and all(candidates["response"].str.strip_chars().str.len_chars() > 0)

    # The policy's requests reached the server, and its accounting is the server's usage.
    answered = served.proxy.posts(200)
    assert len(answered) == len(served.proxy.posts()) == 4  # one request per candidate
    assert sum(" 200 " in line for line in served.access_log(keyless)) == 4
    policy = json.loads((shard / "sampling_accounting.json").read_text())["total"]
    assert policy["calls"] == 4
    assert policy["prompt_tokens"] == _usage_sum(answered, "prompt_tokens") > 0
    assert policy["completion_tokens"] == _usage_sum(answered, "completion_tokens") > 0
    assert manifest["judge_accounting"]["total"]["calls"] == judge_server.double.count()

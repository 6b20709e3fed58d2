"""One process's judge on a shared call cache, for tests/stack/test_call_cache_pg.py:

    python -m tests.stack.cache_client CACHE_URL API_BASE FIRST LAST

asks the helpfulness verdicts of questions FIRST..LAST-1 through `Judge` and the call cache at
CACHE_URL, and prints {"values": [...], "calls": n, "cache_hits": n} as JSON. The key is read from
$LONGREWARD_JUDGE_API_KEY, as every run reads it.
"""

from __future__ import annotations

import asyncio
import json
import sys

from longreward_core.models.call_cache import open_call_cache
from longreward_core.reward.judge import Judge, JudgeConfig
from longreward_core.reward.verdicts import RATING


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"[Task: grade HELPFULNESS]\n<question>\nquestion {i}\n</question>"}]


async def ask(cache_url: str, api_base: str, first: int, last: int) -> dict:
    cache = open_call_cache(cache_url)
    try:
        judge = Judge(JudgeConfig(model="openai/judge-double", api_base=api_base, timeout_s=10, concurrency=4,
                                  backoff_initial_s=0.01, backoff_max_s=0.05), cache)
        values = await asyncio.gather(*(judge.verdict("helpfulness", question(i), RATING) for i in range(first, last)))
        acc = judge.accounting.purpose("helpfulness")
        return {"values": values, "calls": acc.calls, "cache_hits": acc.cache_hits}
    finally:
        cache.close()


if __name__ == "__main__":
    url, base, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(asyncio.run(ask(url, base, first, last))))

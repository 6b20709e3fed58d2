"""The cacheable share of a run's prompts: how much of each request a provider's prefix cache could serve.

Hosted judges (OpenAI, Anthropic, Gemini) and vLLM reuse the computation of a prompt prefix they
saw recently. For each request sent, `PrefixShare.observe` counts its prompt in tokens of the
configured tokenizer and the longest token prefix it shares with any earlier request of the run to
the same model: an upper bound of what a provider's cache can serve (providers also cut at their
own block sizes and evict), independent of whether the provider reports anything.

Earlier prompts are kept per model as big-endian token bytes in sorted order, so the longest
shared prefix with any of them is the longer of the shared prefixes with the two sorted neighbours.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

import numpy as np


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The text of chat messages as sent, in order (content given as text parts included)."""
    parts = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(f"{message.get('role', '')}\n{content}")
    return "\n".join(parts)


def _shared(a: bytes, b: bytes) -> int:
    """Leading 4-byte tokens two encodings share."""
    n = min(len(a), len(b)) // 4
    if n == 0:
        return 0
    x = np.frombuffer(a, dtype=">u4", count=n)
    y = np.frombuffer(b, dtype=">u4", count=n)
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if differ.size else n


class PrefixShare:
    """Counts, request by request, prompt tokens and the tokens shared with an earlier request."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._seen: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, messages: list[dict[str, Any]]) -> tuple[int, int]:
        """(prompt tokens, tokens shared with the longest matching earlier prompt to `model`)."""
        ids = self._tokenizer(prompt_text(messages), add_special_tokens=False)["input_ids"]
        key = np.asarray(ids, dtype=">u4").tobytes()
        with self._lock:
            seen = self._seen.setdefault(model, [])
            at = bisect.bisect_left(seen, key)
            shared = max((_shared(key, seen[i]) for i in (at - 1, at) if 0 <= i < len(seen)), default=0)
            seen.insert(at, key)
        return len(ids), shared

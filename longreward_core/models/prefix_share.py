"""The cacheable share of a run's prompts: how much of each request a provider's prefix cache could serve.

Hosted judges (OpenAI, Anthropic, Gemini) and vLLM reuse the computation of a prompt prefix they
saw recently. For each request sent, `PrefixShare.observe` counts its prompt in tokens of the
configured tokenizer and the longest token prefix it shares with any earlier request of the run to
the same model: an upper bound of what a provider's cache can serve (providers also cut at their
own block sizes and evict), independent of whether the provider reports anything.

Earlier prompts are kept per model as big-endian token bytes in sorted order, so the longest
shared prefix with any of them is the longer of the shared prefixes with the two sorted neighbours.
Tokens take 2 bytes each when the tokenizer's vocabulary fits (the embedded model's does), else 4:
a run keeps every prompt it sent, so this halves the memory that grows with the run.
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


def _shared(a: bytes, b: bytes, dtype: str = ">u4") -> int:
    """Leading tokens (of `dtype`: big-endian, fixed width) two encodings share."""
    n = min(len(a), len(b)) // np.dtype(dtype).itemsize
    if n == 0:
        return 0
    x = np.frombuffer(a, dtype=dtype, count=n)
    y = np.frombuffer(b, dtype=dtype, count=n)
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if differ.size else n


class PrefixShare:
    """Counts, request by request, prompt tokens and the tokens shared with an earlier request."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._seen: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()
        vocabulary = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        self._dtype = ">u2" if vocabulary is not None and vocabulary <= 1 << 16 else ">u4"

    def observe(self, model: str, messages: list[dict[str, Any]]) -> tuple[int, int]:
        """(prompt tokens, tokens shared with the longest matching earlier prompt to `model`)."""
        ids = np.asarray(self._tokenizer(prompt_text(messages), add_special_tokens=False)["input_ids"], dtype=np.int64)
        with self._lock:
            if self._dtype == ">u2" and ids.size and int(ids.max()) >= 1 << 16:  # a token past the stated vocabulary
                self._widen()
            key = ids.astype(self._dtype).tobytes()
            seen = self._seen.setdefault(model, [])
            at = bisect.bisect_left(seen, key)
            shared = max((_shared(key, seen[i], self._dtype) for i in (at - 1, at) if 0 <= i < len(seen)), default=0)
            seen.insert(at, key)
        return len(ids), shared

    def _widen(self) -> None:
        """Keep 4 bytes a token from now on (the sorted order stays: both are big-endian)."""
        self._seen = {
            model: [np.frombuffer(k, dtype=">u2").astype(">u4").tobytes() for k in keys] for model, keys in self._seen.items()
        }
        self._dtype = ">u4"

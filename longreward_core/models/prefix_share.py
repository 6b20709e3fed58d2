"""The cacheable share of a run's prompts: how much of each request a provider's prefix cache could serve.

Hosted judges (OpenAI, Anthropic, Gemini) and vLLM reuse the computation of a prompt prefix they
saw recently. For each request sent, `PrefixShare.observe` counts its prompt in tokens of the
configured tokenizer and the longest token prefix it shares with any earlier request of the run to
the same model: an upper bound of what a provider's cache can serve (providers also cut at their
own block sizes and evict), independent of whether the provider reports anything.

Earlier prompts are kept per model as big-endian token bytes in sorted order, so the longest
shared prefix with any of them is the longer of the shared prefixes with the two sorted neighbours.
Tokens take 2 bytes each when the tokenizer's vocabulary fits (the embedded model's does), else 4.
"Earlier" is the most recent `window_bytes` of prompts (several prompts' worth of judge requests,
while the long shared prefixes are those of one prompt's requests; BENCHMARKS.md measures what a
smaller window loses): the oldest go first, so memory stays bounded however long the run.
"""

from __future__ import annotations

import bisect
import collections
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

    def __init__(self, tokenizer: Any, window_bytes: int = 16 << 20):
        self._tokenizer = tokenizer
        self._seen: dict[str, list[bytes]] = {}
        self._order: collections.deque[tuple[str, bytes]] = collections.deque()  # oldest first
        self._bytes = 0
        self.window_bytes = window_bytes
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
            self._order.append((model, key))
            self._bytes += len(key)
            while self._bytes > self.window_bytes and len(self._order) > 1:
                self._forget_oldest()
        return len(ids), shared

    def _forget_oldest(self) -> None:
        model, key = self._order.popleft()
        seen = self._seen[model]
        del seen[bisect.bisect_left(seen, key)]  # an equal key, if several: the same bytes
        self._bytes -= len(key)

    def _widen(self) -> None:
        """Keep 4 bytes a token from now on (the sorted order stays: both are big-endian)."""

        def wide(key: bytes) -> bytes:
            return np.frombuffer(key, dtype=">u2").astype(">u4").tobytes()

        self._seen = {model: [wide(k) for k in keys] for model, keys in self._seen.items()}
        self._order = collections.deque((model, wide(k)) for model, k in self._order)
        self._bytes *= 2
        self._dtype = ">u4"

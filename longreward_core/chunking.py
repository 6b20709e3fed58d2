"""Token-based document chunking with exact character offsets.

Chunks are cut every `chunk_tokens` tokens of the configured tokenizer, but their boundaries are
character offsets into the original text taken from the tokenizer's offset mapping, never
detokenised text: `text[span.start:span.end] == span.text` always holds, and the chunks tile the
document (no gap, no overlap), so whitespace and characters split across byte-level tokens are
kept exactly.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ChunkSpan:
    """One chunk of a document: `text == document[start:end]`."""

    index: int
    start: int
    end: int
    text: str
    n_tokens: int
    # Position in the document, as a percentage of its characters.
    start_pct: float
    end_pct: float

    @property
    def position_label(self) -> str:
        """E.g. '0%-25%': the chunk's place in the document, for completeness labels."""
        return f"{self.start_pct:.0f}%-{self.end_pct:.0f}%"


def chunk_document(text: str, tokenizer: PreTrainedTokenizerBase, chunk_tokens: int) -> list[ChunkSpan]:
    """Split `text` into consecutive spans of `chunk_tokens` tokens (the last may be shorter)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not text:
        return []
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    # Each chunk starts where its first token starts; the first chunk starts at 0 and the last
    # ends at len(text), so leading/trailing whitespace the tokenizer does not cover is kept.
    starts = [0]
    for first in range(chunk_tokens, len(offsets), chunk_tokens):
        start = max(offsets[first][0], starts[-1])
        if start > starts[-1]:
            starts.append(start)
    bounds = starts + [len(text)]
    token_starts = [o[0] for o in offsets]
    spans = []
    length = len(text)
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        n_tokens = _count_in(token_starts, start, end)
        spans.append(
            ChunkSpan(
                index=i,
                start=start,
                end=end,
                text=text[start:end],
                n_tokens=n_tokens,
                start_pct=100.0 * start / length,
                end_pct=100.0 * end / length,
            )
        )
    return spans


def _count_in(sorted_starts: list[int], start: int, end: int) -> int:
    return bisect.bisect_left(sorted_starts, end) - bisect.bisect_left(sorted_starts, start)


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str | None = None) -> PreTrainedTokenizerBase:
    """A fast tokenizer by name or path; None means the embedded model's (from its GGUF file)."""
    from transformers import AutoTokenizer

    if name is None:
        from longreward_core.embedded import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(name)

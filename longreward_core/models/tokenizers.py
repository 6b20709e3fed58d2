"""Tokenizers: loading by name (or the embedded model's, converted once), and token helpers."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from longreward_core.models.loading import LOAD_LOCK

if TYPE_CHECKING:  # transformers is imported where a tokenizer is loaded, not at start-up
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(name: str | None = None) -> PreTrainedTokenizerBase:
    """A fast tokenizer by name or path; None means the embedded model's (from its GGUF file).

    The embedded model's is loaded as the plain fast tokenizer it is (the class AutoTokenizer
    picks for it), which keeps torch out of the process: AutoTokenizer imports it.

    Loaded once per name, under the process's load lock (`loading.LOAD_LOCK`)."""
    with LOAD_LOCK:
        return _load_tokenizer(name)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    if name is None:
        from transformers import PreTrainedTokenizerFast

        from longreward_core.models.smollm2 import embedded_tokenizer_dir

        return PreTrainedTokenizerFast.from_pretrained(str(embedded_tokenizer_dir()))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two token sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

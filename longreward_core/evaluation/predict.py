"""Generating the answers of the model under test, resumably, as LongBench's `pred.py` does.

Two backends:
- `litellm`: any litellm model, typically an OpenAI-compatible server (vLLM on the GPU pool)
  reached with `openai/<served-name>` and `api_base`. Requests go through the project's client
  (cached, retried, rate limited). Prompts that LongBench sends without a chat template go to the
  server's plain `/completions` endpoint; the others are chat messages, so the server applies
  the model's chat template.
- `transformers`: a local checkpoint folder, loaded once per process, generating on the GPU when
  there is one. The chat template is applied with the tokenizer's own template.

Decoding is greedy (`do_sample=False`, temperature 0) with the task's maximum new tokens. A prompt
longer than `max_input_tokens` keeps its first and last `max_input_tokens // 2` tokens (pred.py's
middle truncation, decoded back to text, before any chat template).

Every finished example is appended at once to its predictions file (a JSON line carrying the
example's `_id`); a re-run skips the `_id`s already there, so a crash or an outage loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic.json_schema import SkipJsonSchema

from longreward_core.data.form import form_order
from longreward_core.data.io import InputError, atomic_write_bytes
from longreward_core.data.records import PredictionSummary, QuarantinedRow
from longreward_core.evaluation.data import load_longbench
from longreward_core.evaluation.longbench import LongBenchDataset, get_dataset
from longreward_core.models.accounting import RunAccounting
from longreward_core.models.call_cache import open_call_cache
from longreward_core.models.client import ApiBase, LLMClient, PolicyClientConfig
from longreward_core.models.errors import ConfigurationError, LLMCallFailed
from longreward_core.models.event_loop import run_async
from longreward_core.models.loading import LOAD_LOCK
from longreward_core.models.secrets import POLICY_API_KEY_ENV

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelSpec(BaseModel):
    """A model under test. Every field is a CLI option / flow parameter."""

    model_config = ConfigDict(json_schema_extra=form_order)  # the form shows required fields first

    name: str | None = Field(
        None, description="Label in results and folder names (letters, digits, '.', '_', '-'); default: the last part of `model`."
    )
    model: str = Field(
        description="litellm model string (backend 'litellm', e.g. `openai/<served-name>` with api_base), "
        "or a checkpoint folder (backend 'transformers')."
    )
    backend: Literal["litellm", "transformers"] = Field("litellm", description="How answers are generated.")
    api_base: ApiBase = Field(None, description="Base URL of an OpenAI-compatible server (vLLM).")
    api_key: SkipJsonSchema[SecretStr | None] = Field(None, exclude=True, description=f"Key; by default ${POLICY_API_KEY_ENV}.")
    tokenizer: str | None = Field(
        None,
        description="Tokenizer (Hugging Face name or folder) that counts the input budget for the litellm backend: "
        "set it to the served model's; default: the embedded SmolLM2 tokenizer. The transformers backend uses the checkpoint's own.",
    )
    max_input_tokens: int = Field(
        31_500, ge=64, description="Prompts longer than this many tokens keep their first and last halves (LongBench's max_length)."
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at once (litellm backend).")
    rpm: int | None = Field(None, ge=1, description="Requests per minute at most (litellm backend).")
    timeout_s: float = Field(600.0, gt=0, description="Hard limit on one request, seconds (litellm backend).")
    device: str | None = Field(None, description="Torch device for the transformers backend; default: cuda when available.")

    @field_validator("name")
    @classmethod
    def _valid_label(cls, value: str | None) -> str | None:
        if value is not None and not _LABEL.match(value):
            raise ValueError(f"model name '{value}' must be letters, digits, '.', '_' or '-' (it names a folder)")
        return value

    @property
    def label(self) -> str:
        """The name results are filed under: `name`, else the model's last part, made safe for a
        folder name; a model whose id is a path (`openai/<org>/<model>`, `openai//root/ckpt`, a
        checkpoint folder) gets a short hash of the whole string after it, so two models that end
        alike never share a folder."""
        if self.name:
            return self.name
        served = self.model.split("/", 1)[1] if self.backend == "litellm" and "/" in self.model else self.model
        tail = re.sub(r"[^A-Za-z0-9._-]", "-", self.model.rstrip("/").split("/")[-1]).lstrip(".-_") or "model"
        if tail == served:
            return tail
        return f"{tail}-{hashlib.sha256(self.model.encode()).hexdigest()[:8]}"

    def client_config(self) -> PolicyClientConfig:
        return PolicyClientConfig(
            model=self.model, api_base=self.api_base, api_key=self.api_key, timeout_s=self.timeout_s,
            concurrency=self.concurrency, rpm=self.rpm,
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to answer, with the source row it came from."""

    id: str
    prompt: str  # already truncated
    chat: bool  # wrap in the chat template (chat endpoint) or send as is
    max_new_tokens: int
    row: dict[str, Any]
    stop_at_newline: bool = False  # samsum: pred.py ends generation at the first newline
    truncated: bool = False  # cut in the middle to the input budget


class Generator(Protocol):
    """Generates answers; `on_answer` is called as each one arrives. Returns id -> the failure for
    the requests that got no answer (the model could not be reached, or refused the request for
    good: `LLMCallFailed.transport` tells them apart); raises on anything else."""

    tokenizer: Any

    def generate(
        self, requests: list[GenerationRequest], on_answer: Callable[[GenerationRequest, str], None]
    ) -> dict[str, LLMCallFailed]: ...


def longbench_truncate_middle(prompt: str, tokenizer: Any, max_tokens: int) -> tuple[str, int, bool]:
    """LongBench's middle truncation: (prompt, its token count, whether it was cut).

    Counted with the tokenizer's special tokens, as pred.py does; a longer prompt becomes the
    decoded first `max_tokens // 2` tokens followed by the decoded last `max_tokens // 2`. Unlike
    `sampling.cut_document_middle`, no marker is inserted, so prompts match the official ones.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt, len(ids), False
    half = max_tokens // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, len(ids), True


def make_request(
    row_id: str, prompt: str, tokenizer: Any, max_input_tokens: int, *, chat: bool, max_new_tokens: int,
    row: dict[str, Any], stop_at_newline: bool = False,
) -> GenerationRequest:
    """A request for `prompt`, cut in the middle to the model's input budget."""
    text, _, cut = longbench_truncate_middle(prompt, tokenizer, max_input_tokens)
    return GenerationRequest(
        id=row_id, prompt=text, chat=chat, max_new_tokens=max_new_tokens, row=row, stop_at_newline=stop_at_newline, truncated=cut,
    )


class LitellmGenerator:
    """Answers from a litellm model through the project's cached, retried client."""

    def __init__(self, spec: ModelSpec, cache_path: str | Path):
        from longreward_core.models.tokenizers import (
            load_tokenizer,  # imports transformers: only when predicting
        )

        self.spec = spec
        self.cache_path = cache_path  # a file path or a database URL (open_call_cache)
        self.tokenizer = load_tokenizer(spec.tokenizer)
        self.accounting = RunAccounting(per_purpose={})

    def generate(
        self, requests: list[GenerationRequest], on_answer: Callable[[GenerationRequest, str], None]
    ) -> dict[str, LLMCallFailed]:
        cache = open_call_cache(self.cache_path)
        failures: dict[str, LLMCallFailed] = {}

        async def run() -> None:
            client = LLMClient(self.spec.client_config(), cache, self.accounting)

            async def one(request: GenerationRequest) -> tuple[GenerationRequest, str | None, LLMCallFailed | None]:
                try:
                    text = await client.complete(
                        "generation", [{"role": "user", "content": request.prompt}], 0.0, 0,
                        raw_prompt=not request.chat, max_tokens=request.max_new_tokens,
                    )
                except ConfigurationError:
                    raise
                except LLMCallFailed as exc:
                    return request, None, exc
                return request, text, None

            for next_done in asyncio.as_completed([one(r) for r in requests]):
                request, text, error = await next_done
                if error is not None:
                    failures[request.id] = error
                else:
                    on_answer(request, text or "")

        try:
            run_async(run())
        finally:
            cache.close()
        return failures


class TransformersGenerator:
    """Greedy answers from a local checkpoint (loaded once per process, see `load_generator`)."""

    def __init__(self, spec: ModelSpec):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(spec.model).is_dir():
            raise InputError(f"{spec.model}: checkpoint folder not found (the transformers backend loads a local folder)")
        self.device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        self.model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype).to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self._pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _input_ids(self, request: GenerationRequest) -> list[int]:
        if request.chat and self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        return self.tokenizer(request.prompt, truncation=False)["input_ids"]

    def answer(self, request: GenerationRequest) -> str:
        """One greedy answer."""
        import torch

        ids = self._input_ids(request)
        inputs = torch.tensor([ids], device=self.device)
        options: dict[str, Any] = {}
        if request.stop_at_newline:
            # pred.py on samsum: stop at a newline, but never before the first new token.
            newline = self.tokenizer.encode("\n", add_special_tokens=False)[-1]
            options = {"eos_token_id": [self.tokenizer.eos_token_id, newline], "min_new_tokens": 1}
        with torch.no_grad():
            output = self.model.generate(
                inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=request.max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=self._pad_token_id,
                **options,
            )[0]
        return self.tokenizer.decode(output[len(ids):], skip_special_tokens=True)

    def generate(
        self, requests: list[GenerationRequest], on_answer: Callable[[GenerationRequest, str], None]
    ) -> dict[str, LLMCallFailed]:
        for request in requests:
            on_answer(request, self.answer(request))
        return {}


_loaded: dict[str, Any] = {}


def load_generator(spec: ModelSpec, cache_path: str | Path) -> Generator:
    """The generator for `spec`. A local checkpoint stays loaded for the next call with the same
    model; loading another one releases it first (one model on the GPU at a time)."""
    if spec.backend == "litellm":
        return LitellmGenerator(spec, cache_path)
    key = json.dumps([spec.model, spec.device])
    with LOAD_LOCK:
        if key not in _loaded:
            _loaded.clear()
            _release_gpu_memory()
            _loaded[key] = TransformersGenerator(spec)
        return _loaded[key]


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class PredictionRun:
    """What one predictions file got in a run."""

    path: Path
    requested: int
    already_done: int
    generated: int = 0
    truncated: int = 0
    not_written: int = 0  # answers the benchmark's own code drops (LongBench v2: empty responses)
    failed: dict[str, str] = field(default_factory=dict)  # id -> why no answer came (unreachable: run again)
    rejected: dict[str, str] = field(default_factory=dict)  # id -> the provider's reason for refusing for good

    def summary(self) -> PredictionSummary:
        return PredictionSummary(
            file=str(self.path), examples=self.requested, already_done=self.already_done, generated=self.generated,
            truncated_prompts=self.truncated, not_written=self.not_written, failed=len(self.failed),
            rejected=len(self.rejected),
        )


def finished_ids(path: str | Path) -> set[str]:
    """`_id`s already in a predictions file. A torn last line (a crash while appending) is
    dropped from the file, so that appending goes on from a clean line. Any other unreadable
    line, or a row without `_id` (a file not written here), is an InputError: resuming it could
    score an example twice."""
    path = Path(path)
    if not path.exists():
        return set()
    lines = path.read_bytes().splitlines(keepends=True)
    done: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        try:
            row = json.loads(raw)
        except ValueError:
            if number == len(lines):
                atomic_write_bytes(path, b"".join(lines[:-1]))
                break
            raise InputError(f"{path}:{number}: not a JSON row; the predictions file is damaged (move it away to start over)") from None
        if not isinstance(row, dict) or row.get("_id") is None:
            raise InputError(
                f"{path}:{number}: no '_id', so the finished examples cannot be told apart (a file not written by "
                "longreward?); move it away to predict again"
            )
        done.add(str(row["_id"]))
    else:
        if lines and not lines[-1].endswith(b"\n"):
            with path.open("ab") as fh:  # the next row must start on its own line
                fh.write(b"\n")
    return done


def predict_file(
    path: str | Path,
    requests: list[GenerationRequest],
    generator: Generator,
    to_row: Callable[[GenerationRequest, str], dict[str, Any] | None],
) -> PredictionRun:
    """Answer the requests whose id is not yet in `path`, appending `to_row(request, answer)` as
    one JSON line per answer (None: nothing is written for that answer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = finished_ids(path)
    todo = [r for r in requests if r.id not in done]
    run = PredictionRun(path=path, requested=len(requests), already_done=len(requests) - len(todo))
    run.truncated = sum(1 for r in todo if r.truncated)
    with path.open("a", encoding="utf-8") as out:

        def write(request: GenerationRequest, answer: str) -> None:
            row = to_row(request, answer)
            if row is None:
                run.not_written += 1
                return
            out.write(json.dumps({**row, "_id": request.id}, ensure_ascii=False) + "\n")
            out.flush()
            run.generated += 1

        failures = generator.generate(todo, write)
    run.failed = {i: str(e) for i, e in failures.items() if e.transport}
    run.rejected = {i: str(e) for i, e in failures.items() if not e.transport}
    return run


def longbench_requests(task: LongBenchDataset, rows: list[dict[str, Any]], tokenizer: Any, max_input_tokens: int) -> list[GenerationRequest]:
    """The requests for a LongBench task's rows: its template, middle truncation, its answer
    length, and the chat template unless LongBench leaves it out for this task."""
    return [
        make_request(
            row["_id"], task.render(row), tokenizer, max_input_tokens, chat=task.chat_template,
            max_new_tokens=task.max_new_tokens, row=row, stop_at_newline=task.name == "samsum",
        )
        for row in rows
    ]


def longbench_row(request: GenerationRequest, answer: str) -> dict[str, Any]:
    """A prediction in LongBench's interchange format (plus `_id`, for resuming)."""
    row = request.row
    return {"pred": answer, "answers": row["answers"], "all_classes": row.get("all_classes"), "length": row["length"]}


@dataclass
class DatasetPrediction:
    run: PredictionRun
    quarantined: list[QuarantinedRow]  # bad rows of the dataset file


def predict_longbench(
    generator: Generator, spec: ModelSpec, dataset: str, out_dir: str | Path, *,
    source: str | Path | None = None, longbench_e: bool = False, limit: int | None = None,
) -> DatasetPrediction:
    """Predictions of one LongBench dataset into `out_dir/<dataset>.jsonl` (resumable)."""
    task = get_dataset(dataset)
    loaded = load_longbench(dataset, source, longbench_e=longbench_e, limit=limit)
    requests = longbench_requests(task, loaded.records, generator.tokenizer, spec.max_input_tokens)
    run = predict_file(Path(out_dir) / f"{dataset}.jsonl", requests, generator, longbench_row)
    return DatasetPrediction(run=run, quarantined=loaded.quarantined)

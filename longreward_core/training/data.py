"""The pairs a DPO run trains on: reading and checking them, and what max_length does to them.

- `load_pairs` reads what `longreward build` publishes (a build folder, its `pairs.parquet` or its
  `datasets` folder), checks the schema, and quarantines bad rows with their reason (or, given the
  rows an earlier check quarantined, drops those without checking the rest again);
- `measure_lengths` / `plan_lengths` tokenise every pair exactly as TRL will and count the pairs
  that `max_length` would drop or truncate, so that training never loses data silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from longreward_core.data.io import InputError, arrow_rows, file_hash
from longreward_core.data.records import QuarantinedRow
from longreward_core.models.tokenizers import common_prefix
from longreward_core.training.config import PAIR_COLUMNS, TrainConfig


class PairsSchemaError(InputError):
    """A preference dataset whose columns are not TRL conversational pairs."""


class TrainingRefused(RuntimeError):
    """Training would drop or truncate pairs and the run did not allow it."""

    def __init__(self, report: LengthReport):
        self.report = report
        super().__init__(
            f"max_length={report.max_length} would drop {report.dropped} and truncate {report.truncated} of "
            f"{report.pairs} pairs (longest pair: {report.longest} tokens; model limit: {report.model_limit}). "
            "Raise --max-length, or pass --allow-truncation to train on what fits."
        )


@dataclass
class PairsDataset:
    """The valid pairs, where they came from, and the rows set aside."""

    dataset: Any  # datasets.Dataset with prompt, chosen, rejected (+ any other columns)
    source: Path
    pairs_sha256: str
    dataset_manifest_sha256: str | None
    quarantined: list[QuarantinedRow] = field(default_factory=list)  # line: the 1-based row number in `source`


def _resolve_pairs(path: Path) -> tuple[Path, Path | None]:
    """(the pairs data, the build manifest next to it if any)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder (expected a build folder, pairs.parquet or a dataset folder)")
    if path.is_dir() and (path / "pairs.parquet").exists():
        return path / "pairs.parquet", path / "manifest.json" if (path / "manifest.json").exists() else None
    manifest = path.parent / "manifest.json"
    if path.is_file() and path.suffix == ".parquet":
        return path, manifest if manifest.exists() else None
    if path.is_dir() and (path / "dataset_info.json").exists():
        return path, manifest if manifest.exists() else None
    raise InputError(
        f"{path}: not a preference dataset; give a build folder (with pairs.parquet), a .parquet file, "
        "or a folder saved by datasets.save_to_disk"
    )


def _check_message_column(source: Path, name: str, column_type: pa.DataType) -> None:
    expected = "a list of {role, content} messages"
    if not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)):
        raise PairsSchemaError(f"{source}: column {name!r} is {column_type}, expected {expected}")
    item = column_type.value_type
    if not pa.types.is_struct(item) or not {"role", "content"} <= {item.field(i).name for i in range(item.num_fields)}:
        raise PairsSchemaError(f"{source}: column {name!r} holds {item}, expected {expected}")
    for key in ("role", "content"):
        kind = item.field(key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PairsSchemaError(f"{source}: column {name!r} has {key} of type {kind}, expected a string")


def _row_problem(row: dict[str, Any]) -> str | None:
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if not prompt or prompt[-1]["role"] != "user":
        return "prompt must end with a user message"
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or any(m["role"] != "assistant" for m in reply):
            return f"{name} must be assistant messages"
        if not any((m["content"] or "").strip() for m in reply):
            return f"{name} is empty"
    if any(m["content"] is None for m in prompt):
        return "prompt has a message with no content"
    return None


def _quarantine_rows(table: pa.Table, source: Path) -> list[QuarantinedRow]:
    """The rows whose conversation is malformed or not valid UTF-8, with the reason; `line` is the
    1-based row number."""
    quarantined = []
    for line, row, raw, reason in arrow_rows(table):
        problem = reason or _row_problem(row)
        if problem is not None:
            row_id = row.get("prompt_id") if row else None
            quarantined.append(QuarantinedRow(source=str(source), line=line, row_id=row_id, reason=problem, raw=raw))
    return quarantined


def load_pairs(path: str | Path, quarantined: list[QuarantinedRow] | None = None) -> PairsDataset:
    """The preference pairs `longreward build` published, schema-checked.

    Raises `PairsSchemaError` (naming the file, the column and the problem) when the columns are
    not TRL conversational pairs, and `InputError` when nothing is left to train on. Rows with a
    malformed conversation are quarantined with their reason; the rest are returned. Given
    `quarantined` (what an earlier `load_pairs` of the same data set aside), those rows are
    dropped by their line and the others are not checked again.
    """
    import datasets

    data_path, manifest = _resolve_pairs(Path(path))
    if data_path.is_file():
        try:
            table = pq.read_table(data_path)
        except pa.ArrowInvalid as err:
            raise InputError(f"{data_path}: not a readable Parquet file ({err})") from err
        pairs_sha256 = file_hash(data_path)
    else:
        table = datasets.load_from_disk(str(data_path)).data.table
        # A saved dataset is one or more Arrow files: hash their hashes, in name order.
        arrow_hashes = "".join(file_hash(f) for f in sorted(data_path.glob("*.arrow")))
        pairs_sha256 = hashlib.sha256(arrow_hashes.encode()).hexdigest()
    missing = [name for name in PAIR_COLUMNS if name not in table.column_names]
    if missing:
        raise PairsSchemaError(
            f"{data_path}: missing column(s) {', '.join(missing)}; preference pairs need prompt, chosen and "
            f"rejected as lists of {{role, content}} messages (found: {', '.join(table.column_names)})"
        )
    for name in PAIR_COLUMNS:
        _check_message_column(data_path, name, table.schema.field(name).type)
    if quarantined is None:
        quarantined = _quarantine_rows(table, data_path)
    dropped = {row.line - 1 for row in quarantined}
    keep = [index for index in range(table.num_rows) if index not in dropped]
    if not keep:
        raise InputError(f"{data_path}: no trainable pairs ({len(quarantined)} rows quarantined, {table.num_rows} read)")
    dataset = datasets.Dataset(table.take(keep))
    return PairsDataset(
        dataset=dataset,
        source=data_path,
        pairs_sha256=pairs_sha256,
        dataset_manifest_sha256=file_hash(manifest) if manifest else None,
        quarantined=quarantined,
    )


@dataclass
class PairLength:
    """Token counts of one pair, tokenised as TRL tokenises conversational pairs."""

    prompt: int
    chosen: int
    rejected: int

    @property
    def sequence(self) -> int:
        """The longer of prompt+chosen and prompt+rejected: what max_length must hold."""
        return self.prompt + max(self.chosen, self.rejected)


def measure_lengths(dataset: Any, tokenizer: Any) -> list[PairLength]:
    """Each pair's prompt / chosen / rejected token counts, the way TRL's DPOTrainer splits them.

    The prompt is rendered with the generation prompt; each completion is whatever follows the
    common prefix of the prompt and the whole conversation.
    """

    def ids(messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
        return list(out["input_ids"])

    lengths = []
    for row in dataset.select_columns(list(PAIR_COLUMNS)):
        prompt = ids(row["prompt"], generation_prompt=True)
        with_chosen = ids(row["prompt"] + row["chosen"])
        with_rejected = ids(row["prompt"] + row["rejected"])
        cut = min(common_prefix(prompt, with_chosen), common_prefix(prompt, with_rejected))
        lengths.append(PairLength(cut, len(with_chosen) - cut, len(with_rejected) - cut))
    return lengths


@dataclass
class LengthReport:
    """What a max_length does to the data: nothing is dropped or cut without being counted."""

    pairs: int
    max_length: int
    model_limit: int | None
    longest: int
    dropped: int  # the prompt alone fills max_length: TRL removes the pair
    truncated: int  # prompt fits, a response is cut at max_length
    dropped_rows: list[int]
    truncated_rows: list[int]
    total_tokens: int  # through the policy per epoch: each prompt twice (with chosen, with rejected), before any cut

    @property
    def lossless(self) -> bool:
        return self.dropped == 0 and self.truncated == 0

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs, longest {self.longest} tokens; max_length {self.max_length}"
            f" (model limit {self.model_limit}): {self.dropped} dropped, {self.truncated} truncated"
        )


def plan_lengths(lengths: list[PairLength], max_length: int | None, model_limit: int | None) -> LengthReport:
    """Choose max_length (the longest pair, within the model's limit, unless given) and count the losses."""
    longest = max(length.sequence for length in lengths)
    if max_length is None:
        max_length = min(longest, model_limit) if model_limit else longest
    dropped = [i for i, length in enumerate(lengths) if length.prompt >= max_length]
    truncated = [i for i, length in enumerate(lengths) if length.prompt < max_length < length.sequence]
    return LengthReport(
        pairs=len(lengths),
        max_length=max_length,
        model_limit=model_limit,
        longest=longest,
        dropped=len(dropped),
        truncated=len(truncated),
        dropped_rows=dropped,
        truncated_rows=truncated,
        total_tokens=sum(length.prompt * 2 + length.chosen + length.rejected for length in lengths),
    )


def model_limit(model_path: str) -> int | None:
    """The model's context window from its config, if it states one."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)


def resolve_base_model(config: TrainConfig) -> str:
    """The base model's folder; the embedded SmolLM2 is converted to a plain checkpoint once."""
    if config.base_model is not None:
        return config.base_model
    from longreward_core.models.smollm2 import embedded_checkpoint

    return str(embedded_checkpoint())


def check_lengths(config: TrainConfig, pairs: PairsDataset, base_model: str) -> LengthReport:
    """Measure every pair and refuse (TrainingRefused) when max_length would lose data unasked."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    report = plan_lengths(measure_lengths(pairs.dataset, tokenizer), config.max_length, model_limit(base_model))
    if not report.lossless and not config.allow_truncation:
        raise TrainingRefused(report)
    return report

"""Small LongBench-family data in the official schemas, and a tiny local model, for the tests."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo"]


def longbench_rows(dataset: str, n: int = 3) -> list[dict]:
    """Rows of THUDM/LongBench's schema for `dataset` (hotpotqa, trec or passage_count)."""
    rows = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        row = {"input": f"Which city is the capital in passage {i}?",
               "context": f"Passage {i}: the capital is {city}. " * 20,
               "answers": [city], "length": 3000 + 2500 * i, "dataset": dataset, "language": "en",
               "all_classes": None, "_id": f"{dataset}-{i}"}
        if dataset == "trec":
            row.update(input=f"Where is {city}?\nType:", context="What is a dog?\nType: Description\n" * 5,
                       answers=["Location"], all_classes=["Description", "Location", "Human"])
        if dataset == "passage_count":
            row.update(input="", answers=[str(i + 1)])
        rows.append(row)
    return rows


def write_longbench(folder: Path, datasets: dict[str, int], *, suffix: str = "") -> Path:
    """`folder/data/<dataset><suffix>.jsonl` for each dataset (with its number of rows)."""
    for dataset, n in datasets.items():
        path = folder / "data" / f"{dataset}{suffix}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in longbench_rows(dataset, n)), encoding="utf-8")
    return folder


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((folder / "data").iterdir()):
            zf.write(path, f"data/{path.name}")
    return archive


def v2_items(n: int = 4) -> list[dict]:
    """LongBench v2 questions (THUDM/LongBench-v2's data.json schema); answers cycle A-D."""
    return [
        {"_id": f"v2-{i}", "domain": "Single-Document QA", "sub_domain": "Academic",
         "difficulty": "easy" if i % 2 == 0 else "hard", "length": ["short", "medium", "long"][i % 3],
         "question": f"  Which city is named in document {i}?  ", "choice_A": "Paris", "choice_B": "Rome",
         "choice_C": "Oslo", "choice_D": "Lima", "answer": "ABCD"[i % 4],
         "context": f"  Document {i} names {['Paris', 'Rome', 'Oslo', 'Lima'][i % 4]}. " * 60}
        for i in range(n)
    ]


def write_v2(path: Path, n: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(v2_items(n)), encoding="utf-8")
    return path


def write_chat(folder: Path, n: int = 2) -> Path:
    """LongBench-Chat's test_cases.json and few_shots.json (LongAlign's LongBench_Chat folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = [{"idx": i + 1, "query": f"What does memo {i} recommend?", "answer": f"It recommends supplier {i}.",
              "prompt": f"Memo {i}: we recommend supplier {i}. " * 10 + f"\nWhat does memo {i} recommend?"} for i in range(n)]
    shots = [[{"answer": f"Supplier {i}.", "score": 10}, {"answer": "No idea.", "score": 1}, {"answer": f"Maybe supplier {i + 1}.", "score": 3}]
             for i in range(n)]
    (folder / "test_cases.json").write_text(json.dumps(cases), encoding="utf-8")
    (folder / "few_shots.json").write_text(json.dumps(shots), encoding="utf-8")
    return folder


def tiny_model(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama with the embedded SmolLM2 tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longreward_core.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

"""Math datasets as declarative entries: a source, the problem/answer fields, a prompt template.

An entry in `config.datasets` either names a preset (`preset: hmmt_feb_2025`) and overrides some
fields, or gives everything itself. Sources:
  hub      `datasets.load_dataset(path, name, split=..., revision=...)`
  local    a .jsonl/.json/.parquet/.csv file, read through `datasets.load_dataset(<format>, ...)`
  builtin  generated here (`arithmetic`: the demo's synthetic problems)
Every source becomes one table with columns id, problem, answer, prompt (the user message).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from entroflow import arithmetic
from entroflow.errors import EntroflowError
from entroflow.io import atomic_temp

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_TEMPLATE = "{problem}\n" + BOXED_INSTRUCTION.replace("{}", "{{}}")

PRESETS: dict[str, dict] = {
    "hmmt_feb_2025": {
        "source": "hub",
        "path": "MathArena/hmmt_feb_2025",
        "split": "train",
        "problem_field": "problem",
        "answer_field": "answer",
        "prompt_template": MATH_TEMPLATE,
    },
    "aime_2025": {
        "source": "hub",
        "path": "MathArena/aime_2025",
        "split": "train",
        "problem_field": "problem",
        "answer_field": "answer",
        "prompt_template": MATH_TEMPLATE,
    },
    "math500": {
        "source": "hub",
        "path": "HuggingFaceH4/MATH-500",
        "split": "test",
        "problem_field": "problem",
        "answer_field": "answer",
        "id_field": "unique_id",
        "prompt_template": MATH_TEMPLATE,
    },
    "gsm8k": {
        "source": "hub",
        "path": "openai/gsm8k",
        "name": "main",
        "split": "test",
        "problem_field": "question",
        "answer_field": "answer",
        "answer_format": "gsm8k",
        "prompt_template": MATH_TEMPLATE,
    },
    "arithmetic": {"source": "builtin", "builtin": "arithmetic", "n": 64, "seed": 0},
}

BUILTINS = {"arithmetic": arithmetic.dataset_records}
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ENTRY_DEFAULTS = {
    "problem_field": "problem",
    "answer_field": "answer",
    "id_field": None,
    "answer_format": "plain",
    "prompt_template": "{problem}",
    "split": "train",
    "name": None,
    "revision": None,
    "limit": None,
}


class DatasetError(EntroflowError):
    """A dataset entry cannot be resolved or loaded; the message names the dataset."""


def _unknown(kind: str, name: str, available) -> DatasetError:
    return DatasetError(f"unknown {kind} '{name}'; available: {', '.join(sorted(available))}")


def resolve_entry(name: str, entry: dict) -> dict:
    """Preset + overrides + defaults -> one complete entry."""
    entry = dict(entry)
    preset = entry.pop("preset", None)
    base = {}
    if preset is not None:
        if preset not in PRESETS:
            raise _unknown("dataset preset", preset, PRESETS)
        base = PRESETS[preset]
    resolved = {**ENTRY_DEFAULTS, **base, **entry}
    source = resolved.get("source")
    if source not in ("hub", "local", "builtin"):
        raise DatasetError(
            f"dataset '{name}': source must be one of hub, local, builtin (got {source!r})"
        )
    if source in ("hub", "local") and not resolved.get("path"):
        raise DatasetError(f"dataset '{name}': source '{source}' needs a 'path'")
    if source == "builtin" and resolved.get("builtin") not in BUILTINS:
        raise _unknown("builtin dataset", str(resolved.get("builtin")), BUILTINS)
    return resolved


def extract_answer(raw, answer_format: str) -> str:
    text = "" if raw is None else str(raw)
    if answer_format == "gsm8k":  # "...reasoning...\n#### 1,234"
        match = re.search(r"####\s*(.+?)\s*$", text)
        return match.group(1).replace(",", "").strip() if match else ""
    if answer_format == "plain":
        return text.strip()
    raise DatasetError(f"unknown answer_format '{answer_format}'; available: gsm8k, plain")


def _load_records(name: str, entry: dict):
    """The raw rows of a source, as a datasets.Dataset or list of dicts."""
    source = entry["source"]
    if source == "builtin":
        return BUILTINS[entry["builtin"]](int(entry.get("n", 64)), int(entry.get("seed", 0)))
    import datasets  # heavy; only for hub/local sources

    if source == "hub":
        return datasets.load_dataset(
            entry["path"], entry["name"], split=entry["split"], revision=entry["revision"]
        )
    path = Path(entry["path"])
    if not path.exists():
        raise DatasetError(f"dataset '{name}': local file not found: {path}")
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(
            f"dataset '{name}': cannot read '{path.suffix}' files; use one of {', '.join(LOCAL_FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise DatasetError(f"dataset '{name}' is empty ({path})")
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except (ValueError, StopIteration) as err:  # e.g. a file with only blank lines
        raise DatasetError(f"dataset '{name}' is empty or unreadable ({path}): {err!r}") from err


def load_problems(name: str, entry: dict) -> pd.DataFrame:
    """Resolve, load and map one dataset entry to columns id, problem, answer, prompt."""
    entry = resolve_entry(name, entry)
    rows = _load_records(name, entry)
    columns = (
        list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0]) if rows else []
    )
    if len(rows) == 0:
        raise DatasetError(f"dataset '{name}' is empty")
    for key in ("problem_field", "answer_field", "id_field"):
        field = entry.get(key)
        if field is not None and field not in columns:
            raise DatasetError(
                f"dataset '{name}': {key} '{field}' is not a column; available: {', '.join(columns)}"
            )
    frame = pd.DataFrame(
        {
            "id": [
                str(r[entry["id_field"]]) if entry["id_field"] else f"{name}-{i}"
                for i, r in enumerate(rows)
            ],
            "problem": [str(r[entry["problem_field"]]) for r in rows],
            "answer": [
                extract_answer(r[entry["answer_field"]], entry["answer_format"]) for r in rows
            ],
        }
    )
    if entry["limit"] is not None:
        frame = frame.iloc[: int(entry["limit"])].reset_index(drop=True)
    try:
        frame["prompt"] = [entry["prompt_template"].format(problem=p) for p in frame["problem"]]
    except (KeyError, IndexError) as err:
        raise DatasetError(
            f"dataset '{name}': prompt_template may only use {{problem}} (braces in LaTeX are written {{{{ }}}}): {err}"
        ) from err
    return frame


def write_parquet_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_temp(path)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_problems(path: str | os.PathLike) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    missing = {"id", "problem", "answer", "prompt"} - set(frame.columns)
    if missing:
        raise DatasetError(f"{path}: missing columns {sorted(missing)}")
    return frame

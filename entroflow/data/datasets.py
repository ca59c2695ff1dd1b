"""Math datasets as declarative entries: a source, the problem/answer fields, a prompt template.

An entry in `config.datasets` either names a preset (`preset: hmmt_feb_2025`) and overrides some
fields, or gives everything itself. Sources:
  hub      `datasets.load_dataset(path, name, split=..., revision=...)`
  local    a .jsonl/.json/.parquet/.csv file, read through `datasets.load_dataset(<format>, ...)`
  builtin  generated here (`arithmetic`: the demo's synthetic problems)
Every source becomes one table with columns id, problem, answer, prompt (the user message).
"""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path

import pandas as pd

from entroflow.data import arithmetic
from entroflow.errors import EntroflowError, first_line
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
    # The evaluation sets of maxent-grpo (its `INFERENCE_DATASETS`): same hub ids, splits, fields.
    "math_500": {
        "source": "hub",
        "path": "HuggingFaceH4/MATH-500",
        "split": "test",
        "problem_field": "problem",
        "answer_field": "answer",
        "id_field": "unique_id",
        "prompt_template": MATH_TEMPLATE,
    },
    "aime24": {
        "source": "hub",
        "path": "HuggingFaceH4/aime_2024",
        "split": "train",
        "problem_field": "problem",
        "answer_field": "answer",
        "id_field": "id",
        "prompt_template": MATH_TEMPLATE,
    },
    "aime25": {
        "source": "hub",
        "path": "yentinglin/aime_2025",
        "split": "train",
        "problem_field": "problem",
        "answer_field": "answer",
        "prompt_template": MATH_TEMPLATE,
    },
    "amc": {  # AMC 2022-2023 (83 problems); answers are numbers such as "142.0"
        "source": "hub",
        "path": "AI-MO/aimo-validation-amc",
        "split": "train",
        "problem_field": "problem",
        "answer_field": "answer",
        "id_field": "id",
        "prompt_template": MATH_TEMPLATE,
    },
    "minerva": {  # Minerva Math (272 problems); the answer is the solution's last \boxed{}
        "source": "hub",
        "path": "svc-huggingface/minerva-math",
        "split": "test",
        "problem_field": "problem",
        "answer_field": "solution",
        "answer_format": "boxed",
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

PRESET_ALIASES = {"math500": "math_500"}  # earlier names, kept working
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
        preset = PRESET_ALIASES.get(preset, preset)
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
    check_template(name, resolved["prompt_template"])
    return resolved


def check_template(name: str, template: str) -> None:
    """A prompt template may hold `{problem}` and literal text only: no attribute or index
    access, conversions or format specs (they would put Python internals into prompts)."""
    hint = "prompt_template may only use {problem} (braces in LaTeX are written {{ }})"
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)]
    except ValueError as err:  # a lone '{' or '}'
        raise DatasetError(f"dataset '{name}': {hint}: {err}") from None
    for field, spec, conversion in fields:
        if field is not None and (field != "problem" or spec or conversion):
            shown = (
                "{"
                + field
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            raise DatasetError(f"dataset '{name}': {hint}; found {shown}")


def extract_answer(raw, answer_format: str) -> str:
    text = "" if raw is None else str(raw)
    if answer_format == "gsm8k":  # "...reasoning...\n#### 1,234"
        match = re.search(r"####\s*(.+?)\s*$", text)
        return match.group(1).replace(",", "").strip() if match else ""
    if answer_format == "plain":
        return text.strip()
    if answer_format == "boxed":  # a worked solution: the content of its last \boxed{...}
        return last_boxed(text)
    raise DatasetError(f"unknown answer_format '{answer_format}'; available: boxed, gsm8k, plain")


def last_boxed(text: str) -> str:
    """The content of the last \\boxed{...} in text, braces balanced ("" if there is none)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return ""
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return ""


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
    if path.is_dir():
        raise DatasetError(f"dataset '{name}': {path} is a folder; give the data file itself")
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(
            f"dataset '{name}': cannot read '{path.suffix}' files; use one of {', '.join(LOCAL_FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise DatasetError(f"dataset '{name}' is empty ({path})")
    if fmt in ("json", "csv"):
        check_text_file(name, path)
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except (ValueError, StopIteration) as err:  # e.g. a file with only blank lines
        raise DatasetError(f"dataset '{name}' is empty or unreadable ({path}): {err!r}") from None
    except Exception as err:  # anything else the reader trips on, named in one line
        raise DatasetError(
            f"dataset '{name}': cannot read {path} as {fmt}: {type(err).__name__} {first_line(err)}"
        ) from None


def check_text_file(name: str, path: Path) -> None:
    """UTF-8 throughout, and for .jsonl one JSON object per non-blank line (.json: one JSON
    document): the first fault is named by file and line, before any reader sees the file."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DatasetError(
            f"dataset '{name}': {path} line {line}: not UTF-8 text (byte {err.start})"
        ) from None
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DatasetError(
                    f"dataset '{name}': {path} line {number}: not JSON ({err})"
                ) from None
            if not isinstance(row, dict):
                raise DatasetError(
                    f"dataset '{name}': {path} line {number}: expected a JSON object per line"
                )
    elif path.suffix.lower() == ".json":
        try:
            json.loads(text)
        except ValueError as err:
            raise DatasetError(f"dataset '{name}': {path}: not JSON ({err})") from None


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
    check_present(name, entry, rows)
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
    frame["prompt"] = [entry["prompt_template"].format(problem=p) for p in frame["problem"]]
    return frame


def check_present(name: str, entry: dict, rows) -> None:
    """Refuse rows whose problem or answer is null or blank (they would be sampled as the prompt
    "None", or graded against nothing): one line with the count and the first row (1-based)."""
    for key in ("problem_field", "answer_field"):
        field = entry[key]
        empty = [
            i for i, r in enumerate(rows, start=1) if r[field] is None or not str(r[field]).strip()
        ]
        if empty:
            raise DatasetError(
                f"dataset '{name}': {len(empty)} row(s) with a null or empty '{field}' "
                f"({key}), the first is row {empty[0]}; fix or drop them"
            )


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

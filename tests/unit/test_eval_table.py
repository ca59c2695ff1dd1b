"""entroflow.eval.table (the run's table across datasets) and entroflow.eval.settings."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from entroflow.config import schema_defaults
from entroflow.eval import table
from entroflow.eval.evaluation import per_seed_metrics, summarize
from entroflow.eval.settings import EvalSettings


def result(step, dataset, rows, ks=(1, 2)):
    """A checkpoint JSON as scripts/evaluate_checkpoint.py writes it, from per-prompt rows."""
    frame = pd.DataFrame(rows)
    per_seed = per_seed_metrics(frame, ks)
    return {
        "step": step,
        "dataset": dataset,
        **summarize(frame, ks),
        "per_seed": {m: {str(s): float(v) for s, v in per_seed[m].items()} for m in per_seed},
    }


# Two seeds x two prompts, 2 samples each; by hand, per seed (mean over the prompts):
#   seed 0: correct [1, 0], [1, 1] -> pass@1 (0.5 + 1) / 2 = 0.75, pass@2 (1 + 1) / 2 = 1,
#           avg@1 (1 + 1) / 2 = 1
#   seed 1: correct [0, 0], [0, 1] -> pass@1 (0 + 0.5) / 2 = 0.25, pass@2 (0 + 1) / 2 = 0.5,
#           avg@1 (0 + 0) / 2 = 0
TWO_SEEDS = [
    {"seed": 0, "id": "a", "n": 2, "correct": [1, 0]},
    {"seed": 0, "id": "b", "n": 2, "correct": [1, 1]},
    {"seed": 1, "id": "a", "n": 2, "correct": [0, 0]},
    {"seed": 1, "id": "b", "n": 2, "correct": [0, 1]},
]
ONE_SEED = [{"seed": 0, "id": "x", "n": 2, "correct": [1, 0]}]


def cell(frame, metric, step, dataset):
    row = frame[(frame.metric == metric) & (frame.step == step) & (frame.dataset == dataset)]
    assert len(row) == 1
    return row.iloc[0]


def test_eval_table_averages_over_seeds_with_standard_error():
    frame = table.long([result(10, "arith", TWO_SEEDS)])
    assert list(dict.fromkeys(frame.metric)) == ["pass@1", "pass@2", "avg@1", "avg@2"]
    # mean of the seeds; SE = std(ddof=1) / sqrt(2) = |x0 - x1| / 2 for two seeds
    for metric, (x0, x1) in {"pass@1": (0.75, 0.25), "pass@2": (1, 0.5), "avg@1": (1, 0)}.items():
        c = cell(frame, metric, 10, "arith")
        assert c["mean"] == pytest.approx((x0 + x1) / 2), metric
        assert c["se"] == pytest.approx(abs(x0 - x1) / 2), metric
        assert (c["seeds"], c["prompts"]) == (2, 2)
    # the JSON's own mean over seeds is the table's
    assert cell(frame, "pass@1", 10, "arith")["mean"] == pytest.approx(0.5)


def test_eval_table_csv_and_markdown(tmp_path):
    results = [
        result(20, "arith", TWO_SEEDS),
        result(10, "arith", TWO_SEEDS),
        result(10, "tiny", ONE_SEED),
        result(20, "tiny", ONE_SEED),
    ]
    frame = table.long(results, datasets=["arith", "tiny"], steps=[10, 20])
    table.write(frame, tmp_path / "table.csv", tmp_path / "table.md")
    csv = pd.read_csv(tmp_path / "table.csv")
    assert list(csv.columns) == ["metric", "step", "arith", "arith_se", "tiny", "tiny_se"]
    assert csv[["metric", "step"]].values.tolist()[:3] == [
        ["pass@1", 10],
        ["pass@1", 20],
        ["pass@2", 10],
    ]
    first = csv.iloc[0]
    assert (first["arith"], first["arith_se"]) == (pytest.approx(0.5), pytest.approx(0.25))
    assert first["tiny"] == 0.5 and math.isnan(first["tiny_se"])  # one seed: no error bar
    back = table.read_wide(tmp_path / "table.csv")
    pd.testing.assert_frame_equal(back, frame[back.columns.tolist()], check_dtype=False)
    md = (tmp_path / "table.md").read_text()
    assert md.count("### ") == 4 and "### Pass@1, mean ± standard error over seeds" in md
    assert "| checkpoint | arith (2 prompts) | tiny (1 prompt) |" in md
    assert "| 10 | 0.500 ± 0.250 | 0.500 |" in md
    assert "| 20 | 0.500 ± 0.250 | 0.500 |" in md
    text = table.text(frame)
    assert text.splitlines()[0] == "Pass@1, mean ± standard error over seeds"
    assert "0.500 ± 0.250" in text and "|" not in text


def test_eval_table_missing_dataset_and_checkpoint():
    results = [result(10, "arith", TWO_SEEDS)]
    frame = table.long(results, datasets=["arith", "never_ran"], steps=[10, 20])
    assert len(frame) == 4 * 2 * 2  # metrics x steps x datasets, whatever is missing
    assert math.isnan(cell(frame, "pass@1", 20, "arith")["mean"])
    assert math.isnan(cell(frame, "pass@1", 10, "never_ran")["mean"])
    csv = table.wide(frame)
    assert csv["never_ran"].isna().all() and csv["arith"].notna().sum() == 4
    md = table.markdown(frame)
    assert "| checkpoint | arith (2 prompts) | never_ran |" in md
    assert "| 10 | 0.500 ± 0.250 | - |" in md and "| 20 | - | - |" in md
    assert "over 2 seeds" in md
    # a result written before per-seed values were kept: its mean, no error bar
    old = {k: v for k, v in results[0].items() if k != "per_seed"}
    assert math.isnan(cell(table.long([old]), "pass@1", 10, "arith")["se"])


def test_eval_settings_defaults_from_schema_and_the_one_dataset_form():
    schema = schema_defaults("runs", "*", "eval")
    for f in dataclasses.fields(EvalSettings):
        if f.name != "datasets":  # default null in the schema: see `dataset`
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            assert default == schema[f.name], f.name
    entry = {**schema, "dataset": "a"}
    assert EvalSettings.from_entry(entry).datasets == ["a"]
    assert EvalSettings.from_entry({**schema, "datasets": ["a", "b"]}).datasets == ["a", "b"]
    assert EvalSettings.from_entry(schema).datasets == []
    params = EvalSettings.from_entry(entry).job_params()
    assert "datasets" not in params and params["k"] == schema["k"]

"""entroflow.report.summary: reads the figures from the files earlier rules wrote, by name."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from entroflow.checkpoint.fisher_run import KERNEL_ARRAYS, FisherResult
from entroflow.report.summary import RunFiles, delta_h_summary, markdown, summarize, write
from tests.unit.test_checkpoint_results import delta_h_result

STATS = {
    "n_tokens": 54321,
    "n_responses": 1024,
    "n_prompts": 128,
    "temperature": 1.0,
    "fraction_below": {"0.01": 0.005, "0.1": 0.75, "0.672": 0.85},
    "percentiles": {"P50": 0.03, "P80": 0.44},
    "forking_percentile": 80,
    "forking_threshold": 0.4431,
    "accuracy": 0.3125,
}


def top_tokens() -> pd.DataFrame:
    high = ["4", "Wait", "\\", "Thus", "Therefore", "NA", "So", "3"]
    rows = [("high", i + 1, t, 100 - i, 1.5, 0.1, "1") for i, t in enumerate(high)]
    rows += [("low", i + 1, t, 900 - i, 0.01, 0.2, "2") for i, t in enumerate(["␣", ".", "="])]
    return pd.DataFrame(
        rows,
        columns=["class", "rank", "token", "count", "mean_entropy", "share_of_class", "token_ids"],
    )


def delta_h_file(path, lr, verdict="confirmed"):
    delta_h_result(lr, verdict).write(path)


def test_summary_reads_each_figure_from_its_file(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    rewards = [0.4, 0.5, 0.45, 0.7, 0.8, 0.75]
    manifest.write_text(
        "".join(json.dumps({"step": i + 1, "reward_mean": r}) + "\n" for i, r in enumerate(rewards))
    )
    eval_table = tmp_path / "table.csv"
    pd.DataFrame(  # eval.table.wide: checkpoint 20 has no result on "small"
        {
            "metric": ["pass@1", "pass@1"],
            "step": [10, 20],
            "arith": [0.25, 0.3],
            "arith_se": [0.05, None],
            "small": [0.5, None],
            "small_se": [None, None],
        }
    ).to_csv(eval_table, index=False)
    delta_h_file(tmp_path / "d10.h5", 1e-3)
    delta_h_file(tmp_path / "d20.h5", 1e-3, verdict="undecided")
    kernel = {name: np.zeros((2, 2)) for name in KERNEL_ARRAYS}
    FisherResult(
        **kernel,
        **dict.fromkeys(("identity_from_kernel", "identity_from_delta_h", "kernel_seconds"), 1.0),
        identity_relative_error=2.5e-9,
        sketch_dim=0,
        sketch_relative_error=np.nan,
        parameters=4,
        gradient_seconds=1.0,
        sequences_per_second=1.0,
    ).write(tmp_path / "k10.h5")
    run = RunFiles(
        "demo",
        manifest=manifest,
        eval_table=eval_table,
        delta_h={10: tmp_path / "d10.h5", 20: tmp_path / "d20.h5"},
        fisher={10: tmp_path / "k10.h5"},
    )
    report = {
        "config": {"steps": 800, "eval_problems": 200},
        "parameters": 452304,
        "vocab_size": 383,
        "final_loss": 0.12,
        "greedy_accuracy": 0.975,
    }
    summary = summarize("demo", STATS, top_tokens(), report, [run], reward_steps=3)

    assert summary["model"]["greedy_accuracy"] == 0.975 and summary["model"]["steps"] == 800
    e = summary["entropy"]
    assert e["n_tokens"] == 54321 and e["forking_threshold"] == 0.4431
    assert e["fraction_below_0.01"] == 0.005 and e["sampled_accuracy"] == 0.3125
    assert e["connectives_in_top_forking_tokens"] == ["Wait", "So", "Thus", "Therefore"]
    assert [t["token"] for t in e["forking_tokens"]][:3] == ["4", "Wait", "\\"]
    r = summary["runs"][0]
    assert r["reward"] == {
        "steps": 6,
        "k": 3,
        "reward_first_steps": pytest.approx(0.45),
        "reward_last_steps": pytest.approx(0.75),
    }
    assert [(row["step"], row["dataset"], row["pass@1"]) for row in r["eval"]] == [
        (10, "arith", 0.25),
        (10, "small", 0.5),
        (20, "arith", 0.3),
    ]
    assert [row["pass@1_se"] for row in r["eval"]] == [0.05, None, None]
    c10, c20 = r["checkpoints"]
    # η = lr is the third row of the sweep
    assert (c10["eta"], c10["delta_h_true"], c10["stderr"], c10["delta_h_first_order"]) == (
        pytest.approx(1e-3),
        3.0,
        pytest.approx(0.6 / 1.96),
        pytest.approx(3.1),
    )
    assert c10["identity_relative_error"] == 2.5e-9 and "identity_relative_error" not in c20
    assert c10["delta_h_true_ci"] == [2.4, 3.6] and c10["verdict"] == "confirmed"
    assert c20["verdict"] == "undecided" and "loglog_slope" not in c10

    write(summary, tmp_path / "s.json", tmp_path / "s.md")
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(json.dumps(summary))
    page = (tmp_path / "s.md").read_text()
    assert "- eval on arith, checkpoint 10: pass@1 0.250 ± 0.050" in page
    assert "- eval on small, checkpoint 10: pass@1 0.500\n" in page
    for text in ("0.975", "54,321", "0.5%", "0.443", "0.312", "0.450 → 0.750"):
        assert text in page, text
    assert c10["relative_error_ci"] == [-0.1, 0.1] and c10["e_responses"] == 4096
    assert (
        "| 10 | 0.00100 | 4,096 | 3.00 [2.40, 3.60] | 20% | 3.10 [2.48, 3.72] | 0.0300 (no"
        " interval) | 0.0200 [-0.0800, 0.120] | 0.00700 [-0.100, 0.100] | confirmed | 2.5e-09 |"
        in page
    )
    assert "| 20 | 0.00100 | 4,096 | 3.00 [2.40, 3.60] | 20% |" in page
    assert "| undecided | - |" in page  # no Fisher file for checkpoint 20
    # Fieller's set for the relative error is unbounded where ΔH's interval holds zero.
    delta_h_file(tmp_path / "unbounded.h5", 1e-3)
    with h5py.File(tmp_path / "unbounded.h5", "a") as f:
        f.attrs["lr"] = 0.25e-3  # η = lr is now the first row
    assert delta_h_summary(tmp_path / "unbounded.h5")["relative_error_ci"] is None


def test_summary_without_model_report_or_runs():
    summary = summarize("smollm2", STATS, top_tokens())
    assert summary["model"] is None and summary["runs"] == []
    page = markdown(summary)
    assert "Demo model" not in page and "54,321 tokens" in page

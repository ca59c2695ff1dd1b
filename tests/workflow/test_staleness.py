"""Only stale work is redone: an unchanged tree schedules nothing; a changed sampling parameter
reruns that experiment's jobs and nothing else."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import make_tiny_model
from tests.workflow.test_workflow import ROOT, job_counts, snakemake


def jobs_by_rule(output: str) -> dict[str, set[str]]:
    """rule -> set of experiment names its scheduled jobs belong to (from their wildcards)."""
    found: dict[str, set[str]] = {}
    for block in output.split("\nrule ")[1:]:
        rule = block.split(":")[0].strip()
        wildcards = [line for line in block.splitlines() if line.strip().startswith("wildcards:")]
        exp = (
            wildcards[0].split("experiment=")[1].split(",")[0].strip()
            if wildcards and "experiment=" in wildcards[0]
            else ""
        )
        found.setdefault(rule, set()).add(exp)
    return found


@pytest.mark.workflow
def test_changing_one_experiment_reruns_only_it(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "tiny-model"
    make_tiny_model(tiny_tokenizer, seed=2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    sampling = {"max_new_tokens": 8, "samples_per_prompt": 2}
    cfg = {
        "datasets": {"arith": {"preset": "arithmetic", "n": 4}},
        "models": {"tiny": {"source": "local", "path": str(model_dir)}},
        "experiments": {
            name: {"model": "tiny", "dataset": "arith", "shards": 1, "sampling": dict(sampling)}
            for name in ("a", "b")
        },
        "analysis": {"min_token_count": 1},
    }
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = (
        "--configfile",
        str(config),
        "--directory",
        str(tmp_path / "work"),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
    )
    run = snakemake("--cores", "2", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    unchanged = snakemake("-n", *args)
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr

    cfg["experiments"]["b"]["sampling"]["temperature"] = 0.7
    config.write_text(yaml.safe_dump(cfg))
    changed = snakemake("-n", *args)
    assert changed.returncode == 0, changed.stderr
    scheduled = jobs_by_rule(changed.stdout)
    for rule in ("generate_responses", "score_entropy", "gather_entropy", "analyze_entropy"):
        assert scheduled[rule] == {"b"}, (rule, scheduled)
    assert "download_dataset" not in job_counts(changed.stdout)

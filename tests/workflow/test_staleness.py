"""Only stale work is redone: an unchanged tree schedules nothing; touching files or editing
comments reruns nothing; a code edit in a library module reruns the rules using it; a changed
sampling parameter reruns that experiment's jobs and nothing else."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from entroflow.code_version import library_modules
from tests.conftest import save_tiny_model, tiny_config
from tests.workflow.test_workflow import ROOT, job_counts, snakemake


def copy_project(dest):
    """The workflow, scripts and library in a folder of their own, so the test can edit them."""
    for part in ("workflow", "scripts", "entroflow", "envs", "config", "profiles"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


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
    model_dir = save_tiny_model(tmp_path / "tiny-model", tiny_tokenizer, seed=2)
    sampling = {"max_new_tokens": 8, "samples_per_prompt": 2}
    cfg = tiny_config(model_dir, 4, {name: {"sampling": dict(sampling)} for name in ("a", "b")})
    cfg["analysis"] = {"min_token_count": 1}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    project = copy_project(tmp_path / "project")
    env = {"PYTHONPATH": str(project)}  # jobs and the Snakefile import the copied library
    args = (
        "--configfile",
        str(config),
        "--directory",
        str(tmp_path / "work"),
        "--snakefile",
        str(project / "workflow/Snakefile"),
    )

    def dry_run():
        result = snakemake("-n", *args, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    def nothing_to_do():
        out = dry_run()
        reasons = sorted({line.strip() for line in out.splitlines() if "reason:" in line})
        return "Nothing to be done" in out or reasons

    run = snakemake("--cores", "2", *args, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert nothing_to_do() is True

    # Touching scripts and library, or editing only comments and docstrings: nothing to do.
    for path in [*(project / "scripts").glob("*.py"), *(project / "entroflow").rglob("*.py")]:
        os.utime(path)
    assert nothing_to_do() is True
    scoring = project / "entroflow/lm/scoring.py"
    original = scoring.read_text()
    scoring.write_text('"""Edited docstring."""\n# a comment\n' + original.split('"""', 2)[2])
    assert nothing_to_do() is True
    scoring.write_text(original)

    # A code edit in entroflow/report/plots.py reruns exactly the rules whose scripts import it.
    plots = project / "entroflow/report/plots.py"
    plots.write_text(plots.read_text() + "\nDPI_OVERRIDE = None\n")
    users = {
        script.stem
        for script in (project / "scripts").glob("*.py")
        if "entroflow.report.plots" in library_modules(script, project / "entroflow")
    }
    scheduled = set(jobs_by_rule(dry_run())) - {"all"}
    assert "plot_entropy_histogram" in scheduled and "generate_responses" not in scheduled
    in_dag = set(jobs_by_rule(snakemake("-n", "--forceall", *args, env=env).stdout))
    assert scheduled == users & in_dag, (scheduled, users & in_dag)
    plots.write_text(plots.read_text().replace("\nDPI_OVERRIDE = None\n", ""))
    assert nothing_to_do() is True

    cfg["experiments"]["b"]["sampling"]["temperature"] = 0.7
    config.write_text(yaml.safe_dump(cfg))
    changed = snakemake("-n", *args, env=env)
    assert changed.returncode == 0, changed.stderr
    scheduled = jobs_by_rule(changed.stdout)
    for rule in ("generate_responses", "score_entropy", "gather_entropy", "analyze_entropy"):
        assert scheduled[rule] == {"b"}, (rule, scheduled)
    assert "download_dataset" not in job_counts(changed.stdout)

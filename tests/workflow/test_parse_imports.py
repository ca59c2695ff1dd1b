"""Parsing the workflow loads no torch, transformers, TRL or PEFT.

Every Snakemake process parses the Snakefile (the dry run, and again inside every cluster job), so
what `workflow/rules/common.smk` imports is paid each time. Here those four packages are made
unimportable (a meta-path finder in a `sitecustomize` on PYTHONPATH) and the dry run and
`entroflow check-config` must still succeed.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.workflow.test_workflow import BIN, ROOT, job_counts, snakemake

HEAVY = ("torch", "transformers", "trl", "peft")

BLOCKER = f'''
import sys


class _Blocker:
    """Refuses {HEAVY} and their submodules, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"blocked by the parse test: {{name}}", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
'''


@pytest.fixture
def blocked_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": pythonpath}


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "python"), "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.workflow
def test_blocker_blocks(blocked_env):
    """The blocker is live in the interpreter the other tests run (else they prove nothing)."""
    for name in HEAVY:
        result = run_python(f"import {name}", blocked_env)
        assert result.returncode != 0
        assert f"blocked by the parse test: {name}" in result.stderr


@pytest.mark.workflow
def test_dry_run_imports_no_heavy_package(blocked_env, tmp_path):
    result = snakemake(
        "-n",
        "--configfile",
        str(ROOT / "config/config.yaml"),
        "--directory",
        str(tmp_path),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
        env=blocked_env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert job_counts(result.stdout).get("train_policy", 0) >= 1  # the whole DAG was built


@pytest.mark.workflow
def test_check_config_imports_no_heavy_package(blocked_env):
    result = subprocess.run(
        [str(BIN / "entroflow"), "check-config", str(ROOT / "config/config.yaml")],
        cwd=ROOT,
        env={**os.environ, **blocked_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config.yaml: ok" in result.stdout

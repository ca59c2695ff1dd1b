"""The workflow as users run it: lint, dry-runs of every shipped config, and a real demo run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from entroflow.io import load_checked

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


def snakemake(*args, cwd=ROOT, timeout=900, env=None):
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        [str(BIN / "snakemake"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_lint():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_snakefmt_clean():
    result = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "workflow"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_dry_run_every_config(config, tmp_path):
    result = snakemake(
        "-n",
        "--configfile",
        str(config),
        "--directory",
        str(tmp_path),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    cfg = yaml.safe_load(config.read_text())
    experiments = {  # plain `snakemake` builds the default targets only
        name: e for name, e in cfg.get("experiments", {}).items() if e.get("default_target", True)
    }
    shards = sum(e.get("shards", 1) for e in experiments.values())
    assert (
        counts.get("generate_responses", 0) == shards and counts.get("score_entropy", 0) == shards
    )
    assert counts.get("gather_entropy", 0) == len(experiments)
    own_runs = [r for r in cfg.get("runs", {}).values() if not r.get("checkpoints")]
    assert counts.get("train_policy", 0) == len(own_runs)


@pytest.mark.parametrize("config", ["config/config.yaml", "config/hmmt_qwen3_8b.yaml"])
def test_hmmt_under_slurm_profile_asks_gpus_for_gpu_rules_only(tmp_path, config):
    """`snakemake --profile slurm results/hmmt/entropy.h5`, the profile named as users type it
    (from the repository root); the default config plans hmmt only when asked for."""
    result = snakemake(
        "results/hmmt/entropy.h5",
        "-n",
        "--profile",
        "slurm",
        "--configfile",
        str(ROOT / config),
        "--directory",
        str(tmp_path),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts == {
        "download_dataset": 1,
        "download_model": 1,
        "generate_responses": 8,
        "score_entropy": 8,
        "gather_entropy": 1,
        "total": 19,
    }
    for block in result.stdout.split("rule ")[1:]:
        name = block.split(":")[0]
        resources = re.search(r"resources: (.*)", block)
        has_gpu = bool(resources and re.search(r"\bgpu=1\b", resources[1]))
        assert has_gpu == (name in ("generate_responses", "score_entropy")), block


def test_multiprocess_run_passes_check_config_and_asks_slurm_for_n_gpus(tmp_path, capsys):
    """runs.*.processes: 2 -> train_policy asks for 2 GPUs on one node; the
    script then runs accelerate launch (tests/unit/test_multiprocess.py runs it on CPU)."""
    from entroflow.cli import main

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["runs"]["demo"]["processes"] = 2
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    result = snakemake(
        "results/runs/demo/run.json",
        "-n",
        "--profile",
        "slurm",
        "--configfile",
        str(path),
        "--directory",
        str(tmp_path / "work"),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    block = result.stdout.split("rule train_policy:")[1].split("\n\n")[0]
    resources = re.search(r"resources: (.*)", block)[1]
    assert re.search(r"\bgpu=2\b", resources) and re.search(r"\bnodes=1\b", resources), block


def small_demo_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["datasets"]["arithmetic"]["n"] = 12
    cfg["demo_model"]["steps"] = 120
    exp = cfg["experiments"]["demo"]
    exp["sampling"]["samples_per_prompt"] = 3
    exp["sampling"]["max_new_tokens"] = 48
    cfg["analysis"]["min_token_count"] = 2
    cfg["datasets"]["arithmetic_eval"]["n"] = 3
    cfg["datasets"]["arithmetic_small"]["n"] = 2
    run = cfg["runs"]["demo"]
    run.update(steps=4, save_every=2, group_size=4, prompts_per_step=2, max_new_tokens=24)
    run["eval"].update(samples_per_prompt=2, k=[1, 2], seeds=[0], max_new_tokens=24)
    # test_demo.py covers ΔH and the kernel on the real demo; this model is too weak for them.
    run["delta_h"]["enabled"] = False
    run["fisher"]["enabled"] = False
    cfg["temperature_sweeps"]["demo"].update(
        t_high=[1.5], t_low=[0.5, 1.0], samples_per_prompt=2, k=[1, 2], max_new_tokens=24, limit=3
    )
    path = tmp_path / "demo-small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.workflow
def test_demo_runs_end_to_end_and_writes_the_contract(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    config = small_demo_config(tmp_path)
    result = snakemake(
        "--cores",
        "2",
        "--configfile",
        str(config),
        "--directory",
        str(work),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = work / "results/demo"
    table = load_checked(out / "entropy.h5")
    assert table.n_prompts == 12 and table.n_responses == 36
    assert table.attrs["temperature"] == 1.0 and table.attrs["model"] == "demo"
    assert "full vocabulary" in table.attrs["entropy_convention"]
    h = table["tokens/entropy"]
    assert (
        np.all(np.isfinite(h))
        and np.all(h >= 0)
        and h.max() <= np.log(len(table["vocab/ids"]) + 400)
    )
    lengths = np.diff(table["responses/offsets"])
    assert np.all(lengths <= 48) and set(table["responses/finish_reason"]) <= {"stop", "length"}
    assert set(np.unique(table["responses/correct"])) <= {0, 1}
    # Engine log-probs at T = 1 without truncation are the scorer's, up to float noise.
    np.testing.assert_allclose(table["tokens/engine_logprob"], table["tokens/logprob"], atol=1e-3)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n_tokens"] == table.n_tokens
    assert stats["forking_threshold"] == pytest.approx(
        np.percentile(h.astype(np.float64), 80), rel=1e-6
    )
    for name in (
        "entropy_histogram.png",
        "wordcloud_high.png",
        "wordcloud_low.png",
        "entropy_by_position.png",
    ):
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG", name
    html = (out / "figures/token_view.html").read_text()
    assert html.count("<section>") == min(24, 36) and 'title="pos 0 · id' in html
    assert "greedy accuracy" in (work / "logs/build_demo_model.log").read_text()
    assert "generated:" in (work / "logs/generate_responses/demo.0-of-2.log").read_text()
    # The training run: checkpoints with optimizer state, a trace per step, figures, eval table.
    run_dir = work / "results/runs/demo"
    for step in (2, 4):
        for name in ("adapter_model.safetensors", "optimizer.pt", "optimizer_param_names.json"):
            assert (run_dir / f"checkpoint-{step}" / name).exists()
    manifest = [json.loads(x) for x in (run_dir / "trace/manifest.jsonl").read_text().splitlines()]
    assert [m["step"] for m in manifest] == [1, 2, 3, 4]
    load_checked(run_dir / "trace" / manifest[0]["file"])
    assert (run_dir / "figures/training.png").read_bytes()[:4] == b"\x89PNG"
    # The table across the run's two evaluation sets: per metric, checkpoints x datasets.
    table = pd.read_csv(run_dir / "eval/table.csv")
    assert list(table.columns) == [
        "metric",
        "step",
        "arithmetic_eval",
        "arithmetic_eval_se",
        "arithmetic_small",
        "arithmetic_small_se",
    ]
    assert table[["metric", "step"]].values.tolist() == [
        [m, s] for m in ("pass@1", "pass@2", "avg@1", "avg@2") for s in (2, 4)
    ]
    assert table[["arithmetic_eval", "arithmetic_small"]].stack().between(0, 1).all()
    assert table.notna()[["arithmetic_eval", "arithmetic_small"]].all().all()
    md = (run_dir / "eval/table.md").read_text()
    assert "| checkpoint | arithmetic_eval (3 prompts) | arithmetic_small (2 prompts) |" in md
    for dataset in ("arithmetic_eval", "arithmetic_small"):
        for step in (2, 4):
            assert (run_dir / f"eval/{dataset}/checkpoint-{step}.json").exists()
    assert "Pass@2, one seed" in (work / "logs/summarize_evaluation/demo.log").read_text()
    # The forking-temperature sweep: one row per (T_high, T_low), threshold = measured P80.
    sweep = pd.read_csv(work / "results/sweeps/demo/table.csv")
    assert list(zip(sweep["t_high"], sweep["t_low"], strict=True)) == [(1.5, 0.5), (1.5, 1.0)]
    assert np.allclose(sweep["threshold"], stats["forking_threshold"])
    assert sweep["prompts"].tolist() == [3, 3] and sweep["pass@2"].between(0, 1).all()
    assert (work / "results/sweeps/demo/heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # An unchanged tree schedules nothing.
    again = snakemake(
        "-n",
        "--configfile",
        str(config),
        "--directory",
        str(work),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
    )
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_external_run_schedules_one_job_per_checkpoint_and_only_new_ones(tmp_path):
    ext = tmp_path / "someone-elses-run"
    for step in (5, 10):
        folder = ext / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "optimizer.pt").touch()
        (folder / "optimizer_param_names.json").touch()
    (ext / "checkpoint-7").mkdir()  # no optimizer state: evaluated, but no ΔH / kernel
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    cfg["experiments"] = {}
    cfg["temperature_sweeps"] = {}  # the demo's sweep needs the demo experiment
    cfg["runs"] = {
        "ext": {
            "model": "demo",
            "checkpoints": str(ext / "checkpoint-*"),
            "eval": {"dataset": "arithmetic_eval"},
            "delta_h": {"enabled": True, "dataset": "arithmetic_train"},
            "fisher": {"enabled": True},
        }
    }
    config = tmp_path / "ext.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    args = (
        "--configfile",
        str(config),
        "--directory",
        str(work),
        "--snakefile",
        str(ROOT / "workflow/Snakefile"),
    )
    first = snakemake("-n", *args)
    assert first.returncode == 0, first.stderr
    counts = job_counts(first.stdout)
    assert "train_policy" not in counts
    assert counts["evaluate_checkpoint"] == 3
    assert counts["estimate_delta_h"] == 2 and counts["compute_fisher_kernel"] == 2
    assert "checkpoint-7: no optimizer.pt" in first.stdout + first.stderr
    # Pretend everything ran: create the outputs, then let --touch order their times.
    (work / "resources/models/demo").mkdir(parents=True)
    (work / "resources/datasets").mkdir(parents=True)
    for name in ("arithmetic_eval", "arithmetic_train"):
        (work / f"resources/datasets/{name}.parquet").touch()
    outputs = [f"eval/arithmetic_eval/checkpoint-{s}.json" for s in (5, 7, 10)] + [
        "eval/table.csv",
        "eval/table.md",
    ]
    outputs += [f"delta_h/checkpoint-{s}.h5" for s in (5, 10)]
    outputs += [f"fisher/checkpoint-{s}/kernel.h5" for s in (5, 10)]
    outputs += [
        f"figures/{f}.png"
        for f in ("delta_h_loglog", "delta_h_first_order", "delta_h_checkpoints", "fisher_kernel")
    ]
    for out in outputs:
        path = work / "results/runs/ext" / out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert snakemake("--touch", "--cores", "1", *args).returncode == 0
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake("-n", *args))
    new = ext / "checkpoint-15"
    new.mkdir()
    (new / "optimizer.pt").touch()
    (new / "optimizer_param_names.json").touch()
    second = snakemake("-n", *args)
    assert second.returncode == 0, second.stderr
    assert job_counts(second.stdout) == {
        "evaluate_checkpoint": 1,
        "estimate_delta_h": 1,
        "compute_fisher_kernel": 1,
        "summarize_evaluation": 1,
        "plot_delta_h": 1,
        "analyze_fisher_kernel": 1,
        "all": 1,
        "total": 7,
    }

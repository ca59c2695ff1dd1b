"""Two configs in one working directory: neither silently overwrites the other's work."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.conftest import save_tiny_model, tiny_config
from tests.workflow.test_workflow import ROOT, snakemake


def run(work, config, *args):
    common = ("--directory", str(work), "--snakefile", str(ROOT / "workflow/Snakefile"))
    return snakemake(*args, "--cores", "1", "--configfile", str(config), *common)


@pytest.mark.workflow
def test_configs_share_a_directory(tmp_path, tiny_tokenizer):
    model = save_tiny_model(tmp_path / "tiny-model", tiny_tokenizer, 1)
    work = tmp_path / "work"
    work.mkdir()
    sampling = {"sampling": {"max_new_tokens": 8, "samples_per_prompt": 1}}
    first = tiny_config(model, 4, {"x": sampling})
    clash = copy.deepcopy(first)  # same dataset name, other problems, another experiment
    clash["datasets"]["arith"]["n"] = 6
    clash["experiments"] = {"y": clash["experiments"].pop("x")}
    paths = {}
    for name, cfg in (("first", first), ("clash", clash)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))

    made = run(work, paths["first"], "results/x/entropy.h5")
    assert made.returncode == 0, made.stderr[-3000:]
    problems = work / "resources/datasets/arith.parquet"
    before = problems.read_bytes()

    # Another config's experiment of the same name, sampled otherwise: refused, nothing touched.
    other = copy.deepcopy(first)
    other["experiments"]["x"]["sampling"]["temperature"] = 0.5
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    refused = run(work, tmp_path / "other.yaml", "results/x/entropy.h5")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "config: experiments.x: results/x/entropy.h5 was made by" in output, output[-3000:]
    assert "differs in experiment" in output

    refused = run(work, paths["clash"], "results/y/shards/scored.0-of-1.h5")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "config: datasets.arith: resources/datasets/arith.parquet was made by" in output
    assert "first.yaml" in output and "clash.yaml" in output and "differs in n" in output
    assert problems.read_bytes() == before

    # Renamed, the second config lives beside the first; each rerun after the other does nothing.
    clash["datasets"] = {"arith2": clash["datasets"].pop("arith")}
    clash["experiments"]["y"]["dataset"] = "arith2"
    paths["clash"].write_text(yaml.safe_dump(clash))
    made = run(work, paths["clash"], "results/y/shards/scored.0-of-1.h5")
    assert made.returncode == 0, made.stderr[-3000:]
    for name, target in (("first", "x/entropy.h5"), ("clash", "y/shards/scored.0-of-1.h5")):
        again = run(work, paths[name], f"results/{target}", "-n")
        assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, (
            again.stdout[-2000:]
        )
    assert problems.read_bytes() == before

    # The config that made a file may change its own dataset: that reruns, as any param does.
    first["datasets"]["arith"]["n"] = 5
    paths["first"].write_text(yaml.safe_dump(first))
    changed = run(work, paths["first"], "results/x/entropy.h5", "-n")
    assert changed.returncode == 0 and "download_dataset" in changed.stdout, changed.stderr[-2000:]

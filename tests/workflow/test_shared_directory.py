"""Two configs in one working directory: neither silently overwrites the other's work."""

from __future__ import annotations

import copy

import pytest
import yaml

from entroflow.config import validate_config
from entroflow.provenance import SharedOutputError, check_config_outputs, run_spec, write_record
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


@pytest.mark.workflow
def test_configs_differing_only_in_trackers_share_a_run(tmp_path, tiny_tokenizer, monkeypatch):
    """A run's report_to is no rerun trigger (config.schema.yaml): a config that differs from the
    one that trained the run only in it is not refused, also by a record written before report_to
    was left out (which holds it). A stage's logging is a param (changing it reruns the stage):
    like any other difference, it is refused."""
    model = save_tiny_model(tmp_path / "tiny-model", tiny_tokenizer, 1)
    first = tiny_config(model, 4, {})
    first["runs"] = {"r": {"model": "tiny", "dataset": "arith", "steps": 2, "save_every": 1}}
    trackers = copy.deepcopy(first)
    trackers["runs"]["r"]["report_to"] = ["tensorboard"]
    (tmp_path / "trackers.yaml").write_text(yaml.safe_dump(trackers))
    work = tmp_path / "work"
    made = work / "results/runs/r/run.json"
    made.parent.mkdir(parents=True)
    made.write_text("{}")  # as if first.yaml trained it: only the record is read at parse time
    validate_config(first)  # defaults filled in, as the workflow records them
    old_record = {"run": first["runs"]["r"], "model": first["models"]["tiny"]}
    assert old_record["run"]["report_to"] == []
    write_record(made, ["../first.yaml"], old_record)

    dry = run(work, tmp_path / "trackers.yaml", "results/runs/r/run.json", "-n")
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0 and "was made by" not in output, output[-3000:]

    validate_config(trackers)
    logging = copy.deepcopy(trackers)
    logging["runs"]["r"]["delta_h"]["logging"]["level"] = "detailed"
    trained = copy.deepcopy(trackers)
    trained["runs"]["r"]["learning_rate"] = 0.5
    monkeypatch.chdir(work)
    for record in (old_record, run_spec(first, "r")):
        write_record(made, ["../first.yaml"], record)
        check_config_outputs(trackers, ["../trackers.yaml"])
        for other in (logging, trained):
            with pytest.raises(SharedOutputError, match="differs in run"):
                check_config_outputs(other, ["../other.yaml"])

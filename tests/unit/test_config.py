"""Config schema + cross-references: defaults filled, each bad input named in one error."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from entroflow.config import ConfigError, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "datasets": {"arith": {"preset": "arithmetic"}},
    "models": {"demo": {"source": "demo"}},
    "experiments": {"e": {"model": "demo", "dataset": "arith"}},
}


def test_defaults_are_filled():
    cfg = validate_config(copy.deepcopy(BASE))
    exp = cfg["experiments"]["e"]
    assert exp["shards"] == 1 and exp["engine"] == "hf"
    assert exp["decoder"] == "auto" and exp["compile"] is True
    assert exp["sampling"] == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": 256,
        "samples_per_prompt": 1,
        "seed": 0,
    }
    assert cfg["scoring"]["chunk_rows"] == 1024 and cfg["analysis"]["forking_percentile"] == 80
    assert cfg["models"]["demo"]["dtype"] == "auto"


def RUN(**entry):  # noqa: N802 - reads as a table row
    return mutated(["runs", "r"], {"model": "demo", "dataset": "arith", **entry})


def mutated(path, value):
    cfg = copy.deepcopy(BASE)
    *parents, last = path
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return cfg


@pytest.mark.parametrize(
    "cfg,message",
    [
        (
            mutated(["experiments", "e", "shards"], "two"),
            "experiments.e.shards: 'two' is not of type 'integer'",
        ),
        (
            mutated(["experiments", "e", "sampling", "temperature"], 0),
            "experiments.e.sampling.temperature",
        ),
        (
            mutated(["experiments", "e", "sampling", "temprature"], 1.0),
            "'temprature' was unexpected",
        ),
        (mutated(["experiments", "e", "model"], "gpt5"), "unknown model 'gpt5'; available: demo"),
        (
            mutated(["experiments", "e", "dataset"], "aime"),
            "unknown dataset 'aime'; available: arith",
        ),
        (
            mutated(["datasets", "arith", "preset"], "aime_2026"),
            "datasets.arith: unknown dataset preset 'aime_2026'",
        ),
        (
            mutated(["models", "m2"], {"source": "local", "path": "/does/not/exist"}),
            "local model folder not found",
        ),
        (mutated(["models", "m2"], {"source": "hub"}), "needs a 'path'"),
        (
            mutated(["models", "m2"], {"source": "hub", "path": "not a hub id"}),
            "neither an existing folder nor a hub id",
        ),
        (
            mutated(["experiments", "e", "engine"], "vllm"),
            "experiments.e.engine: 'vllm' is not one of",
        ),
        (
            mutated(["experiments", "e", "decoder"], "fast"),
            "experiments.e.decoder: 'fast' is not one of",
        ),
        ({**BASE, "experiments": {}}, "nothing to do"),
        (mutated(["runs", "r"], {"model": "demo"}), "give a training 'dataset', or 'checkpoints'"),
        (RUN(steps=7, save_every=2), "multiple of save_every"),
        (RUN(eval={"k": [8]}), "exceed samples_per_prompt"),
        (RUN(model="gpt"), "runs.r.model: unknown model 'gpt'"),
        (RUN(eval={"dataset": "aime"}), "runs.r.eval.dataset: unknown dataset 'aime'"),
        (
            RUN(eval={"datasets": ["arith", "aime"]}),
            "runs.r.eval.datasets.1: unknown dataset 'aime'; available: arith",
        ),
        (
            RUN(eval={"dataset": "arith", "datasets": ["arith"]}),
            "runs.r.eval: give 'dataset' (one) or 'datasets' (a list), not both",
        ),
        (RUN(eval={"datasets": ["arith", "arith"]}), "runs.r.eval.datasets: ['arith', 'arith']"),
        (RUN(fisher={"enabled": True}), "needs delta_h enabled"),
        (
            mutated(
                ["runs", "r"],
                {"model": "demo", "checkpoints": "/x/checkpoint-*", "delta_h": {"enabled": True}},
            ),
            "delta_h.dataset: needed for an external run",
        ),
        (
            mutated(["temperature_sweeps", "s"], {"experiment": "x", "t_high": [1], "t_low": [1]}),
            "temperature_sweeps.s.experiment: unknown experiment 'x'; available: e",
        ),
        (
            mutated(
                ["temperature_sweeps", "s"],
                {"experiment": "e", "t_high": [1], "t_low": [1], "k": [8]},
            ),
            "temperature_sweeps.s.k: [8] exceed samples_per_prompt (4)",
        ),
        (
            mutated(["temperature_sweeps", "s"], {"experiment": "e", "t_high": [0], "t_low": [1]}),
            "temperature_sweeps.s.t_high.0: 0 is less than or equal to the minimum of 0",
        ),
    ],
)
def test_bad_config_names_the_key(cfg, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(cfg)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_validate():
    for path in sorted((ROOT / "config").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg["experiments"] or cfg["runs"], path
        yaml.safe_dump(cfg)


def test_check_config_cli_names_file_and_line(tmp_path, capsys):
    from entroflow.cli import main

    bad = tmp_path / "c.yaml"
    bad.write_text("datasets:\n  a: {preset: arithmetic\nmodels: {}\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "malformed YAML" in err and "line 3" in err
    assert main(["check-config", str(ROOT / "config/config.yaml")]) == 0
    assert "config.yaml: ok (2 experiments, 1 runs" in capsys.readouterr().out


def test_check_config_passes_the_five_presets_in_one_eval(tmp_path, capsys):
    """maxent-grpo's evaluation sets, each a preset, all in one run's `eval.datasets`."""
    from entroflow.cli import main

    presets = ["math_500", "aime24", "aime25", "amc", "minerva"]
    cfg = RUN(
        eval={"datasets": presets, "samples_per_prompt": 8, "k": [1, 8], "seeds": [0, 1, 2, 3, 4]}
    )
    cfg["datasets"].update({name: {"preset": name} for name in presets})
    path = tmp_path / "five.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert "ok (1 experiments, 1 runs, 6 datasets" in capsys.readouterr().out


def renamed(section, old, new):
    cfg = copy.deepcopy(BASE)
    cfg[section][new] = cfg[section].pop(old)
    if section == "datasets":
        cfg["experiments"]["e"]["dataset"] = new
    if section == "models":
        cfg["experiments"]["e"]["model"] = new
    return cfg


@pytest.mark.parametrize(
    "section,old",
    [("experiments", "e"), ("datasets", "arith"), ("models", "demo")],
)
@pytest.mark.parametrize(
    "bad", ["../../x", "a/b", ".hidden", "run(1)", "exp[1]", "with space", "", "x" * 101, 7]
)
def test_names_that_would_leave_their_folder_are_refused(section, old, bad):
    with pytest.raises(ConfigError) as caught:
        validate_config(renamed(section, old, bad))
    message = str(caught.value)
    assert message.startswith(f"config: {section}: bad name {bad!r}") and "\n" not in message


@pytest.mark.parametrize("good", ["hmmt", "qwen3-8b_v1.5", "A.b-c_9", "_x"])
def test_plain_names_pass(good):
    validate_config(renamed("experiments", "e", good))

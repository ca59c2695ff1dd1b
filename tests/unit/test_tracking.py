"""Experiment tracking (runs.*.report_to): TensorBoard event files hold entroflow's own values."""

import copy
import importlib.util
import json

import pytest
import yaml

from entroflow.config import ConfigError, validate_config
from entroflow.data.datasets import load_problems
from entroflow.errors import EntroflowError
from entroflow.training.settings import RunSettings
from tests.conftest import digit_share


def test_tracking_tensorboard_receives_probe_entropy_and_controller(training_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from entroflow.training.run import train_policy
    from entroflow.training.trainer import TENSORBOARD_DIR

    settings = RunSettings(
        steps=2,
        save_every=2,
        group_size=4,
        prompts_per_step=2,
        max_new_tokens=8,
        learning_rate=5e-3,
        algorithm="maxent_grpo",
        report_to=["tensorboard"],
    )
    problems = load_problems("t", {"preset": "arithmetic", "n": 16, "seed": 5})
    out = tmp_path / "run"
    (out / TENSORBOARD_DIR).mkdir(parents=True)
    (out / TENSORBOARD_DIR / "stale").write_text("from an earlier run")
    train_policy(settings, training_model_dir, problems, str(out), reward_funcs=[digit_share])
    assert not (out / TENSORBOARD_DIR / "stale").exists()  # a fresh start clears old events
    assert not (out / "runs").exists()  # not TRL's default place
    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    wanted = {
        "train/probe_predicted",
        "train/probe_realised",
        "train/probe_covariance",
        *(f"train/trace_entropy/{k}" for k in ("mean", "p50", "p80", "p90", "p99")),
        "train/maxent/tau",
        "train/maxent/delta_tau",
        "train/maxent/delta_beta",
    }
    assert wanted <= tags, wanted - tags
    rows = [json.loads(x) for x in (out / "trace/manifest.jsonl").read_text().splitlines()]
    for tb_key, trace_key in [
        ("train/probe_predicted", "probe_predicted"),
        ("train/probe_realised", "probe_realised"),
        ("train/trace_entropy/p90", "p90"),
        ("train/maxent/delta_tau", "maxent/delta_tau"),
    ]:
        scalars = events.Scalars(tb_key)
        assert [s.step for s in scalars] == [1, 2]
        for s, row in zip(scalars, rows, strict=True):
            assert s.value == pytest.approx(row[trace_key], rel=1e-4, abs=1e-7), tb_key


def test_tracking_wandb_is_accepted_and_passed_through(tmp_path, capsys):
    from entroflow.cli import main
    from entroflow.training.trainer import check_trackers, grpo_config

    for trackers in ([], ["tensorboard"], ["wandb"], ["tensorboard", "wandb"]):
        run = {"model": "demo", "dataset": "arith", "report_to": trackers}
        cfg = {
            "datasets": {"arith": {"preset": "arithmetic"}},
            "models": {"demo": {"source": "demo"}},
            "runs": {"r": run},
        }
        assert validate_config(copy.deepcopy(cfg))["runs"]["r"]["report_to"] == trackers
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["check-config", str(tmp_path / "c.yaml")]) == 0, capsys.readouterr().err
    cfg["runs"]["r"]["report_to"] = ["mlflow"]
    with pytest.raises(ConfigError, match=r"runs\.r\.report_to\.0: 'mlflow' is not one of"):
        validate_config(cfg)
    del cfg["runs"]["r"]["report_to"]
    assert validate_config(cfg)["runs"]["r"]["report_to"] == []

    args = grpo_config(RunSettings(report_to=["wandb"]), "/tmp/unused", [1.0])
    assert args.report_to == ["wandb"]
    assert grpo_config(RunSettings(), "/tmp/unused", [1.0]).report_to == []
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(EntroflowError, match="report_to: wandb needs the package wandb") as e:
            check_trackers(["wandb"])
        assert "\n" not in str(e.value) and "WANDB_MODE=offline" in str(e.value)
    check_trackers(["tensorboard"])

"""Training on two CPU processes (accelerate launch, DDP over gloo): one writer, resume."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from entroflow.config import ConfigError, validate_config
from entroflow.data.datasets import load_problems
from entroflow.errors import EntroflowError
from entroflow.lm.checkpoints import load_adam_state
from entroflow.training.launch import accelerate_command, check_deepspeed_config
from entroflow.training.maxent import MaxEntController
from entroflow.training.run import train_policy
from entroflow.training.settings import RunSettings
from entroflow.training.trainer import MAXENT_STATE_FILE
from tests.conftest import digit_share, make_tiny_model

SETTINGS = dict(
    steps=4,
    save_every=2,
    group_size=4,
    prompts_per_step=2,
    max_new_tokens=12,
    learning_rate=5e-3,
    processes=2,
    algorithm="maxent_grpo",  # also its controller, stepped alike on both processes
)


def manifest_steps(run):
    return [json.loads(x)["step"] for x in (run / "trace/manifest.jsonl").read_text().splitlines()]


def test_multiprocess_training_writes_once_and_resumes(tmp_path, tiny_tokenizer, caplog):
    caplog.set_level(logging.INFO)
    model_dir = tmp_path / "model"
    make_tiny_model(tiny_tokenizer, seed=11).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    problems = load_problems("t", {"preset": "arithmetic", "n": 64, "seed": 5})
    run = tmp_path / "run"
    settings = RunSettings(**SETTINGS)
    args = (settings, str(model_dir), problems, str(run))
    summary = train_policy(*args, reward_funcs=[digit_share], threads=2)
    rows = [json.loads(x) for x in (run / "trace/manifest.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: no line twice
    assert all(r["world_size"] == 2 for r in rows)
    assert rows[0]["responses"] == 8  # the main process's share: prompts_per_step x group_size
    assert summary["processes"] == 2 and summary["reward_mean"]["all"]
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    assert rows[-1]["probe_update_norm"] > 0 and "probe_predicted" in rows[-1]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = load_adam_state(run / "checkpoint-4")
    assert state and all(s["step"] == 4 for s in state.values())
    final = load_file(run / "checkpoint-4/adapter_model.safetensors")
    controller = json.loads((run / "checkpoint-4" / MAXENT_STATE_FILE).read_text())
    assert controller["tau"] != MaxEntController().tau  # it moved
    # A kill during step 4: its checkpoint never finished and the manifest has a cut line. The
    # rerun resumes from checkpoint-2 on two processes and re-makes the same checkpoint-4.
    shutil.rmtree(run / "checkpoint-4")
    with open(run / "trace/manifest.jsonl", "a") as f:
        f.write('{"step": 5, "fi')
    train_policy(*args, reward_funcs=[digit_share], threads=2)
    assert manifest_steps(run) == [1, 2, 3, 4]
    again = load_file(run / "checkpoint-4/adapter_model.safetensors")
    assert set(again) == set(final)
    for name in final:
        torch.testing.assert_close(again[name], final[name], atol=1e-5, rtol=1e-4)
    resumed = json.loads((run / "checkpoint-4" / MAXENT_STATE_FILE).read_text())
    assert resumed["tau"] == pytest.approx(controller["tau"])
    assert "2 processes (DistributedType.MULTI_CPU, gloo)" in caplog.text  # ranks' lines, here


def test_multiprocess_command_and_deepspeed_config(tmp_path):
    cmd = accelerate_command(4, "job.json", cuda=True, port=1234)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-3:] == ["-m", "entroflow.training.launch", "job.json"]
    ds = tmp_path / "zero2.json"
    ds.write_text("{}")
    cmd = accelerate_command(2, "job.json", deepspeed_config=str(ds), port=1234)
    assert cmd[cmd.index("--deepspeed_config_file") + 1] == str(ds)
    with pytest.raises(EntroflowError, match="deepspeed_config: file not found"):
        check_deepspeed_config(str(tmp_path / "missing.json"))
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(EntroflowError, match="deepspeed_config: .* ZeRO stage 3 is not supported"):
        check_deepspeed_config(str(ds))
    run = {"model": "demo", "dataset": "a", "processes": 2, "deepspeed_config": "missing.json"}
    cfg = {"datasets": {"a": {"preset": "arithmetic"}}, "models": {"demo": {"source": "demo"}}}
    with pytest.raises(ConfigError, match=r"^config: runs.r.deepspeed_config: file not found"):
        validate_config({**cfg, "runs": {"r": run}})
    run["deepspeed_config"] = str(ds)
    assert validate_config({**cfg, "runs": {"r": run}})["runs"]["r"]["processes"] == 2

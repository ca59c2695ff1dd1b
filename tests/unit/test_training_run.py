"""A real (tiny) TRL GRPO run: checkpoint layout, AdamW state by name, traces, probe, resume."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from entroflow.data.datasets import load_problems
from entroflow.io import check_contract, read_token_file
from entroflow.lm.checkpoints import (
    CheckpointError,
    load_adam_state,
    load_policy,
    require_optimizer_state,
)
from entroflow.training.monitor import EntropyMonitor, ratio_estimate, trainable_parameters
from entroflow.training.run import prompts_dataset, train_policy
from entroflow.training.trainer import PARAM_NAMES_FILE, RunSettings, build_trainer
from tests.conftest import digit_share

SETTINGS = dict(
    steps=4, save_every=2, group_size=4, prompts_per_step=2, max_new_tokens=12, learning_rate=5e-3
)


@pytest.fixture(scope="module")
def problems():
    return load_problems("t", {"preset": "arithmetic", "n": 64, "seed": 5})


def test_checkpoint_state_maps_to_named_parameters(
    training_model_dir, problems, tiny_tokenizer, tmp_path
):
    from entroflow.lm.models import load_model

    settings = RunSettings(**SETTINGS)
    trainer = build_trainer(
        settings,
        load_model(training_model_dir),
        tiny_tokenizer,
        prompts_dataset(problems),
        str(tmp_path),
        reward_funcs=[digit_share],
    )
    monitor = EntropyMonitor.attach(trainer, trace_dir=str(tmp_path / "trace"))
    trainer.train()
    # One way into TRL: the trainer subclass, no methods patched onto the instance.
    assert not {"_calculate_rewards", "_generate_and_score_completions"} & set(vars(trainer))
    assert trainer.last_rollout is not None and len(trainer.last_rollout.completion_ids) == 8
    ckpt = tmp_path / "checkpoint-4"
    for name in (
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        PARAM_NAMES_FILE,
    ):
        assert (ckpt / name).exists(), name
    state = load_adam_state(ckpt)
    live = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(state) == set(live)
    assert monitor.writer.read_manifest()[-1]["probe_update_norm"] > 0  # the adapter really moved
    for name, p in live.items():
        torch.testing.assert_close(
            state[name]["exp_avg"], trainer.optimizer.state[p]["exp_avg"].cpu()
        )
        torch.testing.assert_close(
            state[name]["exp_avg_sq"], trainer.optimizer.state[p]["exp_avg_sq"].cpu()
        )
        assert state[name]["lr"] == pytest.approx(5e-3)
    # The adapter file holds the same tensors under PEFT's saved names.
    saved = load_file(ckpt / "adapter_model.safetensors")
    for name, p in live.items():
        torch.testing.assert_close(saved[name.replace(".default", "")], p.detach().cpu())
    # Trace: one contract-valid file per step, manifest lines with the probe.
    rows = monitor.writer.read_manifest()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        table = read_token_file(tmp_path / "trace" / row["file"])
        check_contract(table, name=row["file"])
        assert table.n_responses == 8 and table.n_prompts == 2
        assert {"reward", "advantage", "group"} <= set(table.groups["responses"])
        np.testing.assert_allclose(
            row["mean"], table["tokens/entropy"].astype(np.float64).mean(), rtol=1e-6
        )
        assert np.isfinite(row["probe_predicted"]) and np.isfinite(row["probe_realised"])


def train_with_monitor(
    training_model_dir, problems, tokenizer, out, settings, monitor_class=None, **kw
):
    from entroflow.lm.models import load_model

    trainer = build_trainer(
        settings,
        load_model(training_model_dir),
        tokenizer,
        prompts_dataset(problems),
        str(out),
        reward_funcs=[digit_share],
    )
    monitor = (monitor_class or EntropyMonitor).attach(trainer, trace_dir=str(out / "trace"), **kw)
    trainer.train()
    return trainer, monitor


@pytest.mark.parametrize("probe_sequences", [0, 3])
def test_probe_is_first_order_exact_for_small_steps(
    training_model_dir, problems, tiny_tokenizer, tmp_path, probe_sequences
):
    """At a tiny learning rate the realised change equals the prediction up to O(lr^2), on all
    rollouts and on a subsample (both sides are measured on the same sampled rollouts)."""
    settings = RunSettings(**{**SETTINGS, "steps": 2, "save_every": 2, "learning_rate": 1e-6})
    _, monitor = train_with_monitor(
        training_model_dir,
        problems,
        tiny_tokenizer,
        tmp_path,
        settings,
        probe_sequences=probe_sequences,
    )
    for row in monitor.writer.read_manifest():
        pred, real = row["probe_predicted"], row["probe_realised"]
        assert abs(pred) > 0
        assert real == pytest.approx(pred, rel=0.05, abs=1e-9)
        assert np.isfinite(row["probe_covariance"])  # Cui et al.'s predictor, logged beside it
        assert row["probe_sequences"] == (probe_sequences or 8)
        if probe_sequences:  # a sample of 3 of 8: the batch values come with standard errors
            assert row["probe_predicted_se"] > 0 and row["probe_realised_se"] > 0
        else:
            assert row["probe_predicted_se"] == 0 == row["probe_realised_se"]


class RecordingMonitor(EntropyMonitor):
    """Keeps θ0, θ1 and the probed rollouts of the last probe step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._theta0 is not None:
            self.recorded = (
                {n: t.clone() for n, t in self._theta0.items()},
                {n: p.detach().clone() for n, p in trainable_parameters(model)},
                list(self._probed),
                self.rollout,
            )
        super().on_optimizer_step(args, state, control, model=model, **kwargs)


@pytest.mark.parametrize("probe_sequences", [0, 3])
def test_probe_prediction_is_the_gradient_along_the_update(
    training_model_dir, problems, tiny_tokenizer, tmp_path, probe_sequences
):
    """The prediction (backward on all rollouts, forward mode on a sample) is exactly
    ⟨∇H̄(θ0), Δθ⟩ with ∇H̄ by backward at θ0 (the probe's definition), at an ordinary learning
    rate where it is not close to the realised change."""
    from entroflow.lm.scoring import batch_scores

    settings = RunSettings(**{**SETTINGS, "steps": 1, "save_every": 1})
    trainer, monitor = train_with_monitor(
        training_model_dir,
        problems,
        tiny_tokenizer,
        tmp_path,
        settings,
        RecordingMonitor,
        probe_sequences=probe_sequences,
    )
    theta0, theta1, idx, rollout = monitor.recorded
    model = trainer.model
    model.eval()
    params = dict(trainable_parameters(model))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(theta0[name])
    h, _ = batch_scores(
        model,
        [rollout.prompt_ids[i] for i in idx],
        [rollout.completion_ids[i] for i in idx],
        pad_token_id=tiny_tokenizer.pad_token_id,
        temperature=monitor.temperature,
    )
    grads = torch.autograd.grad(h.double().mean(), list(params.values()))
    expected = sum(
        float((g.double() * (theta1[n] - theta0[n]).double()).sum())
        for n, g in zip(params, grads, strict=True)
    )
    (row,) = monitor.writer.read_manifest()
    assert abs(expected) > 0
    assert row["probe_predicted"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("options", [{}, {"probe_every": 2, "probe_sequences": 3}])
def test_probe_options_leave_the_trace_unchanged(
    training_model_dir, problems, tiny_tokenizer, tmp_path, options
):
    """The probe (and probe_every, probe_sequences: which steps and rollouts it sees) never
    changes the trained adapter or the trace: the same per-token entropies as without it."""
    settings = RunSettings(**{**SETTINGS, "steps": 2, "save_every": 2})
    _, off = train_with_monitor(
        training_model_dir, problems, tiny_tokenizer, tmp_path / "off", settings, probe=False
    )
    _, on = train_with_monitor(
        training_model_dir, problems, tiny_tokenizer, tmp_path / "on", settings, **options
    )
    rows_off, rows_on = off.writer.read_manifest(), on.writer.read_manifest()
    for a, b in zip(rows_off, rows_on, strict=True):
        ta = read_token_file(tmp_path / "off" / "trace" / a["file"])
        tb = read_token_file(tmp_path / "on" / "trace" / b["file"])
        np.testing.assert_array_equal(ta["tokens/token_id"], tb["tokens/token_id"])
        np.testing.assert_array_equal(ta["tokens/entropy"], tb["tokens/entropy"])
        np.testing.assert_array_equal(ta["tokens/logprob"], tb["tokens/logprob"])
    if not options:
        assert all(np.isfinite(r["probe_predicted"]) for r in rows_on)
        return
    assert "probe_predicted" not in rows_on[0]  # step 1: not a multiple of probe_every
    assert rows_on[1]["probe_sequences"] == 3 and np.isfinite(rows_on[1]["probe_predicted"])
    summary = on.writer.write_summary()
    assert summary["probe_predicted"]["all"][0] is None
    assert summary["probe_predicted"]["last"] == rows_on[1]["probe_predicted"]


def test_ratio_estimate_standard_error_matches_resampling():
    rng = np.random.default_rng(3)
    n = rng.integers(5, 60, 64).astype(float)
    y = 0.3 * n + rng.normal(0, 2, 64) * np.sqrt(n)
    draws = [rng.choice(64, 16, replace=False) for _ in range(4000)]
    estimates = [ratio_estimate(y[d], n[d], 64) for d in draws]
    spread = np.std([e[0] for e in estimates])
    assert np.mean([e[1] for e in estimates]) == pytest.approx(spread, rel=0.1)
    assert ratio_estimate(y, n, 64) == (pytest.approx(y.sum() / n.sum()), 0.0)


def test_resume_after_kill_matches_uninterrupted(training_model_dir, problems, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    settings = RunSettings(**SETTINGS)
    train_policy(settings, training_model_dir, problems, str(full), reward_funcs=[digit_share])
    train_policy(settings, training_model_dir, problems, str(killed), reward_funcs=[digit_share])
    # Simulate a kill during step 4: its checkpoint never finished and the manifest has a cut line.
    shutil.rmtree(killed / "checkpoint-4")
    with open(killed / "trace/manifest.jsonl", "a") as f:
        f.write('{"step": 5, "fi')
    train_policy(settings, training_model_dir, problems, str(killed), reward_funcs=[digit_share])
    steps = [
        json.loads(line)["step"]
        for line in (killed / "trace/manifest.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    a = load_file(full / "checkpoint-4/adapter_model.safetensors")
    b = load_file(killed / "checkpoint-4/adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    policy = load_policy(training_model_dir, killed / "checkpoint-4")
    assert not any("lora" in n for n, _ in policy.named_parameters())


def test_changed_settings_train_from_scratch_not_resume(
    training_model_dir, problems, tmp_path, caplog
):
    """A rerun with other settings (or code) must not resume the old run's last checkpoint and
    call it done: it trains anew, and its checkpoints are those of a fresh run."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    train_policy(
        RunSettings(**SETTINGS), training_model_dir, problems, str(run), reward_funcs=[digit_share]
    )
    other = RunSettings(**{**SETTINGS, "learning_rate": SETTINGS["learning_rate"] * 3})
    train_policy(other, training_model_dir, problems, str(run), reward_funcs=[digit_share])
    assert "training from scratch" in caplog.text
    train_policy(other, training_model_dir, problems, str(fresh), reward_funcs=[digit_share])
    a = load_file(run / "checkpoint-4/adapter_model.safetensors")
    b = load_file(fresh / "checkpoint-4/adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    steps = [json.loads(x)["step"] for x in (run / "trace/manifest.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_without_optimizer_state_is_named(tmp_path):
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="checkpoint-7: no optimizer.pt"):
        require_optimizer_state(folder)


def test_maxent_grpo_trains_and_restores_its_controller(training_model_dir, problems, tmp_path):
    from entroflow.training.maxent import MaxEntController
    from entroflow.training.trainer import MAXENT_STATE_FILE

    settings = RunSettings(
        **{**SETTINGS, "algorithm": "maxent_grpo", "maxent": {"controller": {"tau": 2.0}}}
    )
    out = tmp_path / "maxent"
    train_policy(settings, training_model_dir, problems, str(out), reward_funcs=[digit_share])
    rows = [json.loads(x) for x in (out / "trace/manifest.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    table = read_token_file(out / "trace" / rows[0]["file"])
    adv = table["responses/advantage"].reshape(-1, 4)
    np.testing.assert_allclose(adv.sum(axis=1), 0, atol=1e-5)  # G·w - 1 sums to zero per group
    assert not np.allclose(adv, 0)
    # Each step's row holds the τ, β its weights were made with and the controller's step after.
    tau = np.array([r["maxent/tau"] for r in rows])
    beta = np.array([r["maxent/beta"] for r in rows])
    np.testing.assert_allclose(tau[1:], tau[:-1] + [r["maxent/delta_tau"] for r in rows[:-1]])
    np.testing.assert_allclose(beta[1:], beta[:-1] + [r["maxent/delta_beta"] for r in rows[:-1]])
    assert tau[0] == 2.0 and all(r["maxent/delta_tau"] != 0 for r in rows)
    saved = [
        MaxEntController.from_state(
            json.loads((out / f"checkpoint-{s}" / MAXENT_STATE_FILE).read_text())
        )
        for s in (2, 4)
    ]
    assert (
        saved[0].tau != 2.0 and saved[0] != saved[1]
    )  # the controller moved and was saved each time
    # Resume from checkpoint-2 after losing checkpoint-4: the controller continues from its saved
    # state, so the re-made checkpoint-4 holds the same controller as the uninterrupted run.
    shutil.rmtree(out / "checkpoint-4")
    train_policy(settings, training_model_dir, problems, str(out), reward_funcs=[digit_share])
    resumed = MaxEntController.from_state(
        json.loads((out / "checkpoint-4" / MAXENT_STATE_FILE).read_text())
    )
    assert resumed.tau == pytest.approx(saved[1].tau) and resumed.beta == pytest.approx(
        saved[1].beta
    )

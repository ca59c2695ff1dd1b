"""The MaxEnt-GRPO τ/β meta-controller: each mode's step by hand, its state, its config keys."""

import copy
import json
import math

import numpy as np
import pytest
import yaml

from entroflow.config import ConfigError, validate_config
from entroflow.training.maxent import (
    MaxEntController,
    maxent_weights,
    weight_entropy,
    weight_entropy_tau_gradient,
    weight_logits,
)

T, FLOOR = 0.5, 1e-6

# Two groups of three: equal rewards (q uniform), and rewards T·(log 2, 0, 0) (q = ½, ¼, ¼); the
# reference log-probs are equal within a group, so with τ + β = 1, w = q in both groups.
REWARDS = np.array([[1.0, 1.0, 1.0], [T * math.log(2), 0.0, 0.0]])
REF = np.array([[-3.0, -3.0, -3.0], [-5.0, -5.0, -5.0]])
TAU, BETA = 0.8, 0.2


def objective(tau: float, beta: float, target: float, rewards=REWARDS, ref=REF) -> float:
    """J(τ) = ½ (H̄(w(τ, β)) - H*)², in float64."""
    w = maxent_weights(rewards, ref, tau, beta, T, FLOOR)
    return 0.5 * (weight_entropy(w) - target) ** 2


def hand_example():
    z = weight_logits(REWARDS, REF, TAU, BETA, T, FLOOR)
    w = np.exp(z - z.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(w, [[1 / 3] * 3, [0.5, 0.25, 0.25]], rtol=1e-5)
    return z


def test_meta_controller_analytic_gradient_matches_finite_difference():
    rng = np.random.default_rng(0)
    rewards, ref = rng.normal(size=(4, 5)), rng.normal(-20, 4, size=(4, 5))
    for tau, beta, target in [(0.7, 0.1, 1.0), (2.0, 0.5, 1.5), (0.3, 0.0, 0.2)]:
        c = MaxEntController(tau=tau, beta=beta, target_weight_entropy=target, meta_lr=0.05)
        z = weight_logits(rewards, ref, tau, beta, T, FLOOR)
        h = 1e-6
        fd = (objective(tau + h, beta, target, rewards, ref)) - objective(
            tau - h, beta, target, rewards, ref
        )
        fd /= 2 * h
        assert c.tau_gradient(z) == pytest.approx(fd, rel=1e-6, abs=1e-12)
        step = c.update(z, kl_now=0.3)
        assert step["delta_tau"] == pytest.approx(-0.05 * fd, rel=1e-6, abs=1e-12)
        assert c.tau == pytest.approx(tau - 0.05 * fd, rel=1e-9)
        assert step["delta_beta"] == pytest.approx(0.05 * (0.3 - c.target_kl))


def test_meta_controller_analytic_on_the_2x3_example():
    # dH/dτ = Var_w(z) / (τ + β): 0 in the uniform group, (log 2)² / 4 in the other.
    z = hand_example()
    assert weight_entropy_tau_gradient(z, TAU, BETA) == pytest.approx(math.log(2) ** 2 / 8)
    c = MaxEntController(tau=TAU, beta=BETA, target_weight_entropy=1.0, meta_lr=0.1)
    h_bar = (math.log(3) + 1.5 * math.log(2)) / 2
    assert c.tau_gradient(z) == pytest.approx((h_bar - 1.0) * math.log(2) ** 2 / 8, rel=1e-6)


def test_meta_controller_first_order_on_the_2x3_example():
    # H = log 3 and ½ log 2 + ½ log 4; the truncated gradient is the error H̄ - H* itself.
    z = hand_example()
    c = MaxEntController(
        TAU, BETA, target_weight_entropy=1.0, target_kl=0.05, mode="first_order", meta_lr=0.1
    )
    h_bar = (math.log(3) + 1.5 * math.log(2)) / 2
    step = c.update(z, kl_now=0.3)
    assert step["tau_grad"] == pytest.approx(h_bar - 1.0, rel=1e-6)
    assert c.tau == pytest.approx(TAU - 0.1 * (h_bar - 1.0), rel=1e-6)  # flat: τ falls
    assert c.beta == pytest.approx(BETA + 0.1 * 0.25)  # KL above target: β rises
    assert step["delta_tau"] == pytest.approx(c.tau - TAU)
    assert step["delta_beta"] == pytest.approx(0.025)
    # Too peaked and KL below target: τ rises, β falls, and β stops at 0.
    c = MaxEntController(TAU, 0.001, 2.0, target_kl=0.05, mode="first_order", meta_lr=0.1)
    c.update(z, kl_now=0.0)
    assert c.tau > TAU and c.beta == 0.0


def test_meta_controller_static_is_unchanged():
    z = hand_example()
    c = MaxEntController(tau=TAU, beta=BETA, target_weight_entropy=0.1, mode="static")
    before = c.state()
    step = c.update(z, kl_now=5.0)
    assert c.state() == before
    assert step == {"delta_tau": 0.0, "delta_beta": 0.0, "tau_grad": 0.0, "beta_grad": 0.0}


def test_meta_controller_state_round_trip(tmp_path):
    z = hand_example()
    for mode in ("analytic", "first_order", "static"):
        c = MaxEntController(tau=1.3, beta=0.1, mode=mode, meta_lr=0.2, tau_bounds=(0.5, 4.0))
        for kl in (0.2, 0.01, 0.1):
            c.update(z, kl)
        path = tmp_path / f"{mode}.json"
        path.write_text(json.dumps(c.state()))
        restored = MaxEntController.from_state(json.loads(path.read_text()))
        assert restored == c
        a, b = restored.update(z, 0.3), c.update(z, 0.3)  # and it continues identically
        assert a == b and restored == c
    with pytest.raises(ValueError, match=r"unknown keys \['rate'\]"):
        MaxEntController.from_state({"tau": 1.0, "beta": 0.05, "rate": 0.1})
    with pytest.raises(ValueError, match="maxent.controller.mode: unknown mode 'adam'"):
        MaxEntController(mode="adam")


BASE = {
    "datasets": {"arith": {"preset": "arithmetic"}},
    "models": {"demo": {"source": "demo"}},
    "runs": {"r": {"model": "demo", "dataset": "arith", "algorithm": "maxent_grpo"}},
}


@pytest.mark.parametrize("mode", ["analytic", "first_order", "static"])
def test_meta_controller_modes_pass_check_config(mode, tmp_path, capsys):
    from entroflow.cli import main

    cfg = copy.deepcopy(BASE)
    cfg["runs"]["r"]["maxent"] = {"controller": {"mode": mode, "meta_lr": 0.05}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    controller = validate_config(copy.deepcopy(cfg))["runs"]["r"]["maxent"]["controller"]
    assert controller["mode"] == mode and controller["tau"] == 1.0
    default = validate_config(copy.deepcopy(BASE))["runs"]["r"]["maxent"]["controller"]
    assert default["mode"] == "analytic" and default["meta_lr"] == 0.1


def test_meta_controller_old_and_bad_keys_are_named():
    cfg = copy.deepcopy(BASE)
    cfg["runs"]["r"]["maxent"] = {"controller": {"rate": 0.1}}
    with pytest.raises(ConfigError, match=r"runs\.r\.maxent\.controller\.rate: removed"):
        validate_config(cfg)
    cfg["runs"]["r"]["maxent"] = {"controller": {"mode": "adam"}}
    with pytest.raises(ConfigError, match=r"runs\.r\.maxent\.controller\.mode: 'adam' is not one"):
        validate_config(cfg)

"""The algorithm registry reproduces the conventions it replaced, bit for bit.

The old definitions are copied here verbatim: TRL settings from training/trainer.py, `rl_loss`
from estimators/delta_h.py, the Fisher coefficients from checkpoint/fisher_run.py and the
informative-group rule from checkpoint/delta_h_run.py.
"""

import itertools

import numpy as np
import pytest
import torch

from entroflow.estimators.delta_h import SequenceScores
from entroflow.training.algorithms import (
    ALGORITHMS,
    algorithm,
    group_advantages,
    loss_coefficients,
    rl_loss,
)

NAMES = ("grpo", "dr_grpo", "maxent_grpo")


def old_rl_loss(scores, advantages, algorithm, max_new_tokens):
    b = len(scores.logprob)
    if algorithm in ("dr_grpo", "maxent_grpo"):
        total = sum(float(a) * lp.sum() for a, lp in zip(advantages, scores.logprob, strict=True))
        return -total / (b * max_new_tokens)
    if algorithm == "grpo":
        total = sum(
            float(a) * lp.sum() / max(len(lp), 1)
            for a, lp in zip(advantages, scores.logprob, strict=True)
        )
        return -total / b
    raise ValueError(f"unknown algorithm '{algorithm}'")


def old_fisher_coefficients(advantages, u_lengths, algorithm, max_new_tokens):
    if algorithm == "grpo":
        return advantages / (len(advantages) * u_lengths)
    return advantages / (len(advantages) * max_new_tokens)


def batch(seed: int, n: int = 6, max_new: int = 9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_new + 1, size=n)
    logprob = [
        torch.tensor(-rng.exponential(size=int(n_t)), dtype=torch.float64, requires_grad=True)
        for n_t in lengths
    ]
    advantages = rng.normal(size=n)
    return SequenceScores(entropy=[lp.detach() for lp in logprob], logprob=logprob), advantages


def test_trl_settings_are_the_old_ones():
    old_loss_type = {"grpo": "grpo", "dr_grpo": "dr_grpo", "maxent_grpo": "dr_grpo"}
    assert set(ALGORITHMS) == set(NAMES) | {"infoseed_grpo"}
    infoseed, grpo = (
        algorithm("infoseed_grpo"),
        algorithm("grpo"),
    )  # grpo's RL part, seed terms apart
    assert (infoseed.loss_type, infoseed.advantages, infoseed.per_length) == (
        grpo.loss_type,
        grpo.advantages,
        grpo.per_length,
    )
    for name in NAMES:
        assert algorithm(name).loss_type == old_loss_type[name]
        assert algorithm(name).scale_rewards == ("none" if name == "dr_grpo" else "group")
    assert [algorithm(n).listwise for n in NAMES] == [False, False, True]
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'; available: grpo"):
        algorithm("ppo")


@pytest.mark.parametrize("name", NAMES)
def test_rl_loss_and_its_gradient_are_the_old_ones(name):
    scores, advantages = batch(1)
    new = rl_loss(scores, advantages, name, 9)
    g_new = torch.autograd.grad(new, scores.logprob)
    old = old_rl_loss(scores, advantages, name, 9)
    g_old = torch.autograd.grad(old, scores.logprob)
    assert torch.equal(new, old)
    for a, b in zip(g_new, g_old, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_are_rl_loss_gradient_and_old_fisher_coefficients(name):
    """L = -Σ c_i S_i: ∂L/∂log π(y_it) = -c_i for every token of sequence i."""
    scores, advantages = batch(2)
    lengths = np.array([len(lp) for lp in scores.logprob], dtype=np.float64)
    c = loss_coefficients(advantages, lengths, name, 9)
    np.testing.assert_array_equal(c, old_fisher_coefficients(advantages, lengths, name, 9))
    grads = torch.autograd.grad(rl_loss(scores, advantages, name, 9), scores.logprob)
    for c_i, g in zip(c, grads, strict=True):
        np.testing.assert_allclose(g.numpy(), np.full(len(g), -c_i), rtol=1e-14, atol=0)
    # and the loss itself is -Σ c_i S_i
    s = np.array([float(lp.detach().sum()) for lp in scores.logprob])
    assert float(rl_loss(scores, advantages, name, 9)) == pytest.approx(-(c * s).sum(), rel=1e-13)


@pytest.mark.parametrize("format_weight", [0.0, 0.5, 0.1])
def test_group_advantages_and_informative_groups_are_the_old_rule(format_weight):
    g = 4
    # every combination of correct / formatted over a group of 4, as the math rewards make them
    pairs = list(itertools.product([0.0, 1.0], repeat=2))
    rows = [
        [c + format_weight * f for c, f in combo] for combo in itertools.product(pairs, repeat=g)
    ]
    rewards = np.array(rows, dtype=np.float64).reshape(-1)
    old_mask = np.repeat(rewards.reshape(-1, g).std(1) > 0, g)
    for name in ("grpo", "dr_grpo"):
        algo = algorithm(name)
        np.testing.assert_array_equal(algo.informative(rewards, g), old_mask)
        np.testing.assert_array_equal(
            algo.group_advantages(rewards, g), group_advantages(rewards, g, scale=name == "grpo")
        )
    maxent = algorithm("maxent_grpo")
    assert maxent.informative(rewards, g).all()
    with pytest.raises(ValueError, match="MaxEnt"):
        maxent.group_advantages(rewards, g)

"""Rewards, advantages, MaxEnt weights and pass@k against direct formulas."""

import math
from itertools import combinations

import numpy as np
import pytest

from entroflow.eval.evaluation import avg_at_k, pass_at_k, summarize
from entroflow.training.algorithms import group_advantages, informative_groups
from entroflow.training.maxent import (
    MaxEntController,
    maxent_advantages,
    maxent_weights,
    target_distribution,
    weight_entropy,
)
from entroflow.training.rewards import correctness_rewards, format_rewards


def test_rewards_from_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "so \\boxed{12}"}],
        [{"role": "assistant", "content": "\\boxed{13}"}],
        [{"role": "assistant", "content": "no box 12"}],
        [{"role": "assistant", "content": "\\boxed{12} or \\boxed{12}"}],
    ]
    assert correctness_rewards(completions, ["12"] * 4) == [1.0, 0.0, 1.0, 1.0]
    assert format_rewards(completions) == [1.0, 1.0, 0.0, 0.0]


def test_group_advantages_match_hand_computation():
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1], dtype=float)
    adv = group_advantages(rewards, 4)
    g = rewards[:4]
    expected = (g - g.mean()) / (g.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(adv[:4], expected)
    np.testing.assert_allclose(adv[4:], 0.0)
    np.testing.assert_allclose(group_advantages(rewards, 4, scale=False)[:4], g - 0.5)
    assert informative_groups(rewards, 4).tolist() == [True, False]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_maxent_weights_against_direct_formula():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, (3, 5)).astype(float)
    ref = -rng.random((3, 5)) * 20
    tau, beta, temp, eps = 0.7, 0.3, 0.5, 1e-3
    w = maxent_weights(rewards, ref, tau, beta, temp, eps)
    for g in range(3):
        q = [math.exp(r / temp) for r in rewards[g]]
        q = [max(x / sum(q), eps) for x in q]
        q = [x / sum(q) for x in q]
        logits = [
            math.log(qi) / (tau + beta) + beta / (tau + beta) * ref[g, i] for i, qi in enumerate(q)
        ]
        z = [math.exp(v - max(logits)) for v in logits]
        np.testing.assert_allclose(w[g], [v / sum(z) for v in z], rtol=1e-12)
    assert np.allclose(w.sum(1), 1)
    adv = maxent_advantages(w)
    np.testing.assert_allclose(adv.reshape(3, 5).sum(1), 0, atol=1e-12)


def test_target_floor_and_limits():
    q = target_distribution(np.array([[0.0, 100.0]]), 0.1, 1e-3)
    assert q[0, 0] == pytest.approx(1e-3 / (1 + 1e-3))
    # With beta = 0 and a huge tau, weights become uniform (maximal entropy).
    w = maxent_weights(np.array([[0.0, 1.0, 1.0, 0.0]]), np.zeros((1, 4)), 1e9, 0.0, 0.5, 1e-3)
    assert weight_entropy(w) == pytest.approx(math.log(4))


@pytest.mark.parametrize("mode", ["analytic", "first_order"])
def test_controller_moves_toward_targets_and_round_trips(mode):
    peaked = np.array([[4.0, 0.0, 0.0, 0.0]])  # weight logits: H(w) well below log 4
    c = MaxEntController(tau=1.0, beta=0.1, target_weight_entropy=1.0, target_kl=0.05, mode=mode)
    c.update(peaked, kl_now=0.2)  # too peaked, KL too high
    assert c.tau > 1.0 and c.beta > 0.1
    tau, beta = c.tau, c.beta
    c.update(peaked / 10, kl_now=0.0)  # too flat, KL low
    assert c.tau < tau and c.beta < beta
    assert MaxEntController.from_state(c.state()) == c


def brute_force_pass_at_k(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n,c,k", [(4, 0, 1), (4, 1, 1), (4, 1, 4), (5, 2, 2), (8, 3, 4), (10, 9, 3)]
)
def test_pass_at_k_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_needs_enough_samples_and_summary_averages_seeds():
    with pytest.raises(ValueError, match="at least 5"):
        pass_at_k(4, 1, 5)
    import pandas as pd

    results = pd.DataFrame(
        [
            {"seed": 0, "id": "a", "n": 4, "correct": [1, 0, 0, 0]},
            {"seed": 0, "id": "b", "n": 4, "correct": [0, 0, 0, 0]},
            {"seed": 1, "id": "a", "n": 4, "correct": [1, 1, 0, 0]},
            {"seed": 1, "id": "b", "n": 4, "correct": [0, 1, 0, 0]},
        ]
    )
    s = summarize(results, [1, 2])
    assert s["pass@1"] == pytest.approx(((0.25 + 0) / 2 + (0.5 + 0.25) / 2) / 2)
    assert s["avg@1"] == pytest.approx(((1 + 0) / 2 + (1 + 0) / 2) / 2)
    assert s["pass@2"] == pytest.approx(((0.5 + 0) / 2 + (1 - 1 / 6 + 0.5) / 2) / 2)
    assert avg_at_k([1, 0, 1, 1], 2) == 0.5

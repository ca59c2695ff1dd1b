"""MaxEnt-GRPO: listwise sequence weights toward a reward-shaped target, entropy-controlled.

Within each group of G responses with rewards r and reference log-probs log π_ref(y):
  q   = max(softmax(r / reward_temperature), ε), renormalised            (target distribution)
  w   = softmax( log q / (τ + β) + (β / (τ + β)) · log π_ref(y) )         (listwise weights)
and the policy is pushed toward w through advantages A_i = G · w_i - 1 (zero-sum per group).
τ is steered so that the weights' entropy H(w) tracks a target, β so that the measured KL to the
reference tracks a target (both multiplicative controllers, state saved with each checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def target_distribution(rewards: np.ndarray, temperature: float, floor: float) -> np.ndarray:
    """q per group (..., G): softmax of rewards at a temperature, floored at ε and renormalised."""
    q = np.exp(_log_softmax(np.asarray(rewards, dtype=np.float64) / temperature))
    q = np.maximum(q, floor)
    return q / q.sum(axis=-1, keepdims=True)


def maxent_weights(
    rewards: np.ndarray,
    ref_logprobs: np.ndarray,
    tau: float,
    beta: float,
    reward_temperature: float,
    floor: float,
) -> np.ndarray:
    """w (n_groups, G) from rewards and reference sequence log-probs of the same shape."""
    q = target_distribution(rewards, reward_temperature, floor)
    logits = np.log(q) / (tau + beta) + (beta / (tau + beta)) * np.asarray(
        ref_logprobs, dtype=np.float64
    )
    return np.exp(_log_softmax(logits))


def weight_entropy(w: np.ndarray) -> float:
    """Mean over groups of H(w) in nats."""
    return float(-(w * np.log(np.clip(w, 1e-300, None))).sum(axis=-1).mean())


@dataclass
class MaxEntController:
    tau: float = 1.0
    beta: float = 0.05
    target_weight_entropy: float = 1.5  # nats; log(8) = 2.08 is uniform over a group of 8
    target_kl: float = 0.05
    rate: float = 0.1
    tau_bounds: tuple[float, float] = (1e-3, 1e3)
    beta_bounds: tuple[float, float] = (0.0, 10.0)

    def update(self, weight_entropy_now: float, kl_now: float | None) -> None:
        """Raise τ when the weights are too peaked (H(w) below target), lower it when too flat;
        raise β when the KL to the reference exceeds its target."""
        self.tau *= math.exp(self.rate * (self.target_weight_entropy - weight_entropy_now))
        self.tau = min(max(self.tau, self.tau_bounds[0]), self.tau_bounds[1])
        if kl_now is not None and self.target_kl > 0:
            self.beta *= math.exp(
                self.rate * float(np.clip(kl_now / self.target_kl - 1.0, -1.0, 1.0))
            )
            self.beta = min(max(self.beta, self.beta_bounds[0]), self.beta_bounds[1])

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> MaxEntController:
        state = dict(state)
        for key in ("tau_bounds", "beta_bounds"):
            if key in state:
                state[key] = tuple(state[key])
        return cls(**state)


def maxent_advantages(w: np.ndarray) -> np.ndarray:
    """A_i = G · w_i - 1 per group (zero-sum), flattened in group order."""
    return (w.shape[-1] * w - 1.0).reshape(-1)

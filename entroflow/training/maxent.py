"""MaxEnt-GRPO: listwise sequence weights toward a reward-shaped target, entropy-controlled.

Within each group of G responses with rewards r and reference log-probs log π_ref(y):
  q   = max(softmax(r / reward_temperature), ε), renormalised            (target distribution)
  z   = ( log q + β · log π_ref(y) ) / (τ + β)                            (weight logits)
  w   = softmax(z)                                                        (listwise weights)
and the policy is pushed toward w through advantages A_i = G · w_i - 1 (zero-sum per group).

The meta-controller (`MaxEntController`, state saved with each checkpoint) moves τ so that the
weights' entropy H̄(w) (mean over groups) tracks a target H*, and β so that the measured KL to
the reference tracks a target, once per step, by one of three modes:

- `analytic`: τ descends the closed-form gradient of J(τ) = ½ (H̄(w) - H*)² through the softmax.
  With s = ∂z/∂τ = -z / (τ + β), dH(w)/dτ = -Cov_w(z, s) = Var_w(z) / (τ + β) per group, so
      τ ← τ - meta_lr · (H̄ - H*) · mean_groups Var_w(z) / (τ + β).
- `first_order`: the truncated gradient: the chain stops at H (∂H/∂τ taken as 1), so
      τ ← τ - meta_lr · (H̄ - H*).
- `static`: τ and β stay as configured.

In both moving modes β ← β + meta_lr · (KL - target_kl) (not below 0; unchanged when target_kl
is 0): the measured KL is the policy's, not a function of β within the step, so β follows the
error itself, raising the pull toward π_ref when the policy has drifted too far.

Where this differs from liv-daliberti/maxent-grpo's meta-controller (src/maxent_grpo/training/
controller_objective.py, controller_optimizer.py, weighting/logic.py, as of its commit 8392b2b):
there, `analytic` applies the error H - H* (and KL - target) as the gradient, which is this
`first_order`; its `first_order` (truncated_backprop) reads autograd gradients left on τ by the
training loss, but its weights are computed from a float τ or detached, so no gradient reaches τ
and it falls back to that same rule. Here `analytic` carries the chain rule through the softmax,
which scales τ's step by how sensitive H(w) is to τ (both move τ the same way: dH/dτ ≥ 0). Also
not taken over: its separate τ and β rates, β's gradient clip, the update interval and Adam on
τ, β (here one plain step of meta_lr per step); and its weights divide by τ (or a stored
denominator) where ours divide by τ + β throughout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from entroflow.config import schema_defaults
from entroflow.errors import EntroflowError


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def target_distribution(rewards: np.ndarray, temperature: float, floor: float) -> np.ndarray:
    """q per group (..., G): softmax of rewards at a temperature, floored at ε and renormalised."""
    q = np.exp(_log_softmax(np.asarray(rewards, dtype=np.float64) / temperature))
    q = np.maximum(q, floor)
    return q / q.sum(axis=-1, keepdims=True)


def weight_logits(
    rewards: np.ndarray,
    ref_logprobs: np.ndarray,
    tau: float,
    beta: float,
    reward_temperature: float,
    floor: float,
) -> np.ndarray:
    """z = (log q + β log π_ref) / (τ + β) per group (n_groups, G): w = softmax(z)."""
    q = target_distribution(rewards, reward_temperature, floor)
    return (np.log(q) + beta * np.asarray(ref_logprobs, dtype=np.float64)) / (tau + beta)


def maxent_weights(
    rewards: np.ndarray,
    ref_logprobs: np.ndarray,
    tau: float,
    beta: float,
    reward_temperature: float,
    floor: float,
) -> np.ndarray:
    """w (n_groups, G) from rewards and reference sequence log-probs of the same shape."""
    return weights_from_logits(
        weight_logits(rewards, ref_logprobs, tau, beta, reward_temperature, floor)
    )


def weights_from_logits(logits: np.ndarray) -> np.ndarray:
    """w = softmax(z) within each group."""
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64)))


def weight_entropy(w: np.ndarray) -> float:
    """Mean over groups of H(w) in nats."""
    return float(-(w * np.log(np.clip(w, 1e-300, None))).sum(axis=-1).mean())


def weight_entropy_tau_gradient(logits: np.ndarray, tau: float, beta: float) -> float:
    """dH̄(w)/dτ at the logits z (n_groups, G) made at τ, β: mean over groups of Var_w(z)/(τ+β)."""
    z = np.asarray(logits, dtype=np.float64)
    w = weights_from_logits(z)
    mean = (w * z).sum(axis=-1, keepdims=True)
    return float(((w * (z - mean) ** 2).sum(axis=-1) / (tau + beta)).mean())


_CONTROLLER = schema_defaults("runs", "*", "maxent", "controller")
CONTROLLER_MODES = ("analytic", "first_order", "static")


@dataclass
class MaxEntController:
    """τ, β and how they move (module docstring); defaults: runs.*.maxent.controller."""

    tau: float = _CONTROLLER["tau"]
    beta: float = _CONTROLLER["beta"]
    target_weight_entropy: float = _CONTROLLER["target_weight_entropy"]  # log(8): uniform, G = 8
    target_kl: float = _CONTROLLER["target_kl"]
    mode: str = _CONTROLLER["mode"]
    meta_lr: float = _CONTROLLER["meta_lr"]
    tau_bounds: tuple[float, float] = (1e-3, 1e3)
    beta_bounds: tuple[float, float] = (0.0, 10.0)

    def __post_init__(self):
        if self.mode not in CONTROLLER_MODES:
            raise EntroflowError(
                f"maxent.controller.mode: unknown mode {self.mode!r}; "
                f"choose one of {', '.join(CONTROLLER_MODES)}"
            )

    def tau_gradient(self, logits: np.ndarray) -> float:
        """The mode's gradient of J = ½ (H̄(w) - H*)² with respect to τ, at logits z made at the
        current τ, β (0 for static)."""
        if self.mode == "static":
            return 0.0
        error = weight_entropy(weights_from_logits(logits)) - self.target_weight_entropy
        if self.mode == "first_order":
            return error
        return error * weight_entropy_tau_gradient(logits, self.tau, self.beta)

    def beta_signal(self, kl_now: float | None) -> float:
        """The error β follows, KL - target_kl (0 for static, a missing KL or target_kl = 0)."""
        if self.mode == "static" or kl_now is None or self.target_kl <= 0:
            return 0.0
        return float(kl_now) - self.target_kl

    def update(self, logits: np.ndarray, kl_now: float | None) -> dict[str, float]:
        """One controller step from this step's weight logits z (made at the current τ, β) and
        measured KL. Returns the step: delta_tau, delta_beta and the gradients used."""
        tau_grad, beta_signal = self.tau_gradient(logits), self.beta_signal(kl_now)
        tau0, beta0 = self.tau, self.beta
        self.tau = min(max(tau0 - self.meta_lr * tau_grad, self.tau_bounds[0]), self.tau_bounds[1])
        self.beta = min(
            max(beta0 + self.meta_lr * beta_signal, self.beta_bounds[0]), self.beta_bounds[1]
        )
        return {
            "delta_tau": self.tau - tau0,
            "delta_beta": self.beta - beta0,
            "tau_grad": tau_grad,
            "beta_grad": beta_signal,
        }

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> MaxEntController:
        """The controller saved by `state()`; a state file from before the modes (with `rate`,
        the old multiplicative step) is named as such."""
        state = dict(state)
        unknown = set(state) - {f.name for f in fields(cls)}
        if unknown:
            raise EntroflowError(
                f"maxent controller state: unknown keys {sorted(unknown)} (a state saved before "
                "the controller took mode and meta_lr)"
            )
        for key in ("tau_bounds", "beta_bounds"):
            if key in state:
                state[key] = tuple(state[key])
        return cls(**state)


def maxent_advantages(w: np.ndarray) -> np.ndarray:
    """A_i = G · w_i - 1 per group (zero-sum), flattened in group order."""
    return (w.shape[-1] * w - 1.0).reshape(-1)

"""Replaying one AdamW step (torch semantics, decoupled weight decay) from a checkpoint's state.

torch.optim.AdamW on parameter θ with gradient g and state (m, v, t):
    m' = β1 m + (1-β1) g,  v' = β2 v + (1-β2) g²,  t' = t + 1
    m̂ = m' / (1 - β1^t'),  v̂ = v' / (1 - β2^t'),  D = √v̂ + ε
    Δθ = -lr (m̂ / D + wd θ)           so the direction is  v_dir = Δθ / lr = -(m̂ / D + wd θ)
With D held fixed, v_dir is linear in g: v_dir = gradient_part + remainder with
    gradient_part = -(1-β1) g / ((1 - β1^t') D)        (sums over sequences when g does)
    remainder     = -β1 m / ((1 - β1^t') D) - wd θ     (momentum + weight decay, no new data)
P = 1 / D is the preconditioner of the Fisher kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AdamStep:
    direction: dict[str, torch.Tensor]  # v_dir = Δθ / lr
    gradient_part: dict[str, torch.Tensor]
    remainder: dict[str, torch.Tensor]
    denominator: dict[str, torch.Tensor]  # D = √v̂ + ε
    lr: float


def replay_adamw(
    params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict[str, dict]
) -> AdamStep:
    """One AdamW step's direction for every named parameter, from `load_adam_state`-style state."""
    direction, grad_part, remainder, denom = {}, {}, {}, {}
    lrs = set()
    for name, theta in params.items():
        s = state[name]
        beta1, beta2 = s["betas"]
        eps, wd = s["eps"], s["weight_decay"]
        lrs.add(float(s["lr"]))
        g = grads[name].to(theta.dtype)
        m = s.get("exp_avg", torch.zeros_like(theta)).to(theta.dtype)
        v = s.get("exp_avg_sq", torch.zeros_like(theta)).to(theta.dtype)
        t = float(s.get("step", 0)) + 1
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        m_new = beta1 * m + (1 - beta1) * g
        v_new = beta2 * v + (1 - beta2) * g * g
        d = (v_new / bc2).sqrt() + eps
        grad_part[name] = -(1 - beta1) * g / (bc1 * d)
        remainder[name] = -beta1 * m / (bc1 * d) - wd * theta
        direction[name] = -(m_new / bc1) / d - wd * theta
        denom[name] = d
    if len(lrs) > 1:
        raise ValueError(
            f"parameter groups have different learning rates {sorted(lrs)}; one step size is assumed"
        )
    return AdamStep(direction, grad_part, remainder, denom, lrs.pop() if lrs else 0.0)


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Σ_α a_α b_α over named tensors, accumulated in float64."""
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))

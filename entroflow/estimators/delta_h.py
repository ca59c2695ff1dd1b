"""Entropy change of one update step: SNIS ground truth ΔH(η) against the first order δH₁(η).

Notation (math.md): sequences y_i with prompt x_i, S(y) = Σ_t log π(y_t | ...), H_t the exact
full-vocabulary entropy at step t, L_i the length. The entropy functional is
  h_i = Σ_t H_t      (Rao-Blackwellised, "rb")   or   h_i = -S(y_i)   ("surprisal"),
normalised per sequence (E[h]) or per token (E[h] / E[L]).

Every estimator takes base weights a_i: uniform 1/N for samples y_i ~ π_θ (the E-batch), or
a_i = π_θ(y_i) over *all* sequences for exact enumeration on a tiny vocabulary (the tests' oracle),
so the same code is checked against exact values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from entroflow.lm.scoring import batch_scores, token_budget_batches


@contextlib.contextmanager
def shifted(model: torch.nn.Module, direction: dict[str, torch.Tensor], eta: float):
    """Parameters θ + η·v inside the block, restored bit-exactly after (no model copy: only the
    shifted tensors, e.g. the LoRA weights, are saved)."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in direction}
    try:
        with torch.no_grad():
            for n, d in direction.items():
                params[n].add_(d.to(params[n].dtype), alpha=eta)
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


@dataclass
class SequenceScores:
    entropy: list[torch.Tensor]  # [N] of (L_i,) H_t
    logprob: list[torch.Tensor]  # [N] of (L_i,) log π(y_t)


def score_sequences(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    temperature: float,
    max_tokens_per_batch: int = 8192,
    accum_dtype: torch.dtype = torch.float64,
) -> SequenceScores:
    """Per-sequence H_t and log π(y_t) tensors, in input order; differentiable if grad is on."""
    entropy: list = [None] * len(responses)
    logprob: list = [None] * len(responses)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    for batch in token_budget_batches(lengths, max_tokens_per_batch):
        h, lp = batch_scores(
            model,
            [prompts[i] for i in batch],
            [responses[i] for i in batch],
            pad_token_id=pad_token_id,
            temperature=temperature,
            accum_dtype=accum_dtype,
        )
        offset = 0
        for i in batch:
            n = len(responses[i])
            entropy[i], logprob[i] = h[offset : offset + n], lp[offset : offset + n]
            offset += n
    return SequenceScores(entropy, logprob)


def functional_values(
    scores: SequenceScores, estimator: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h_i, S_i, L_i) as float64 arrays."""
    s = np.array([float(lp.detach().double().sum()) for lp in scores.logprob])
    lengths = np.array([len(lp) for lp in scores.logprob], dtype=np.float64)
    if estimator == "rb":
        h = np.array([float(e.detach().double().sum()) for e in scores.entropy])
    elif estimator == "surprisal":
        h = -s
    else:
        raise ValueError(f"unknown estimator '{estimator}'; available: rb, surprisal")
    return h, s, lengths


def entropy_value(
    h: np.ndarray, lengths: np.ndarray, weights: np.ndarray, per_token: bool
) -> float:
    w = weights / weights.sum()
    return float((w * h).sum() / ((w * lengths).sum() if per_token else 1.0))


@dataclass
class SnisResult:
    delta: float
    ess: float
    clip_fraction: float
    stderr: float


def snis_delta(
    h_old: np.ndarray,
    h_new: np.ndarray,
    log_ratio: np.ndarray,
    lengths: np.ndarray,
    base: np.ndarray,
    per_token: bool,
    clip: float | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> SnisResult:
    """ΔH = H_{θ'} - H_θ with self-normalised weights w_i ∝ a_i exp(S_θ'(y_i) - S_θ(y_i)).

    `clip` caps w_i / mean(w) (None: no clipping); ESS = (Σw)² / Σw² counts effective samples.
    """

    def estimate(idx: np.ndarray) -> tuple[float, float, float]:
        lw = log_ratio[idx] + np.log(base[idx])
        w = np.exp(lw - lw.max())
        clipped = 0.0
        if clip is not None:
            cap = clip * w.mean()
            clipped = float((w > cap).mean())
            w = np.minimum(w, cap)
        new = (w * h_new[idx]).sum() / ((w * lengths[idx]).sum() if per_token else w.sum())
        old = entropy_value(h_old[idx], lengths[idx], base[idx], per_token)
        return float(new - old), float(w.sum() ** 2 / (w**2).sum()), clipped

    all_idx = np.arange(len(h_old))
    delta, ess, clipped = estimate(all_idx)
    stderr = float("nan")
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = [estimate(rng.integers(0, len(all_idx), len(all_idx)))[0] for _ in range(bootstrap)]
        stderr = float(np.std(draws, ddof=1))
    return SnisResult(delta, ess, clipped, stderr)


def _baseline(values: np.ndarray, weights: np.ndarray, leave_one_out: bool) -> np.ndarray:
    """Per-sequence baseline: weighted mean of the others (sampled) or of all (exact weights)."""
    total, wsum = (weights * values).sum(), weights.sum()
    if not leave_one_out or len(values) < 2:
        return np.full_like(values, total / wsum)
    return (total - weights * values) / (wsum - weights)


def first_order_surrogate(
    scores: SequenceScores,
    weights: np.ndarray,
    estimator: str,
    per_token: bool,
    leave_one_out: bool,
) -> torch.Tensor:
    """A scalar whose gradient is ∇_θ H (the entropy functional's exact gradient in expectation).

    rb:        Σ_t ∇H_t + Σ_k (G_k - b_k) ∇ log π(y_k),  G_k = Σ_{t>k} H_t (causal reverse sum)
    surprisal: -(S - b) ∇S
    per token: ∇(E[h] / E[L]) = (∇E[h] - H ∇E[L]) / E[L], ∇E[L] = E[(L - b) ∇S]
    Baselines b have zero expected contribution; they only reduce variance.
    """
    w = weights / weights.sum()
    h, s, lengths = functional_values(scores, estimator)
    value = entropy_value(h, lengths, w, per_token)
    terms = []
    if estimator == "rb":
        # G_k baselines: the weighted mean over sequences of G at the same position k.
        max_len = int(lengths.max()) if len(lengths) else 0
        g_rows = np.zeros((len(w), max_len))
        for i, e in enumerate(scores.entropy):
            e_np = e.detach().double().cpu().numpy()
            g_rows[i, : len(e_np)] = np.cumsum(e_np[::-1])[::-1] - e_np  # Σ_{t>k} H_t
        present = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.float64)
        num = (w[:, None] * present * g_rows).sum(0)
        den = (w[:, None] * present).sum(0)
        for i, (e, lp) in enumerate(zip(scores.entropy, scores.logprob, strict=True)):
            n = len(lp)
            if leave_one_out:
                b = (num[:n] - w[i] * g_rows[i, :n]) / np.maximum(den[:n] - w[i], 1e-300)
            else:
                b = num[:n] / np.maximum(den[:n], 1e-300)
            adv = torch.as_tensor(g_rows[i, :n] - b, dtype=lp.dtype, device=lp.device)
            terms.append(w[i] * (e.sum() + (adv * lp).sum()))
    else:
        b = _baseline(s, w, leave_one_out)
        for i, lp in enumerate(scores.logprob):
            terms.append(-w[i] * float(s[i] - b[i]) * lp.sum())
    surrogate = torch.stack(terms).sum()
    if per_token:
        b_len = _baseline(lengths, w, leave_one_out)
        length_grad = sum(
            w[i] * float(lengths[i] - b_len[i]) * lp.sum() for i, lp in enumerate(scores.logprob)
        )
        surrogate = (surrogate - value * length_grad) / float((w * lengths).sum())
    return surrogate


def entropy_gradient(
    model,
    scores: SequenceScores,
    weights: np.ndarray,
    estimator: str,
    per_token: bool,
    leave_one_out: bool,
) -> dict[str, torch.Tensor]:
    """∇_θ H over the model's trainable parameters, by name (one backward of the surrogate)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    surrogate = first_order_surrogate(scores, weights, estimator, per_token, leave_one_out)
    return dict(zip(params, torch.autograd.grad(surrogate, list(params.values())), strict=True))


def fit_loglog(eta: np.ndarray, delta: np.ndarray) -> tuple[float, float]:
    """Slope and R² of log|ΔH| against log η over η > 0 with ΔH ≠ 0."""
    ok = (eta > 0) & (np.abs(delta) > 0) & np.isfinite(delta)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    x, y = np.log(eta[ok]), np.log(np.abs(delta[ok]))
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    r2 = 1 - (resid**2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300)
    return float(slope), float(r2)

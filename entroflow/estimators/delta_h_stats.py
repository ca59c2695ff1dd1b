"""ΔH estimators on per-token arrays, vectorised over resamples of the E-batch.

Everything here is numpy on padded (N, T) float64 arrays of the E-batch y_i ~ π_θ (mask M):
H_t and log π(y_t) at θ, their directional derivatives along the update direction v (one
forward-mode JVP: dH_t = ⟨∇H_t, v⟩, dlp_t = ⟨∇ log π(y_t), v⟩), and per-sequence values at
θ + ηv. A resample is a row of counts c_i (how often sequence i is drawn): c = 1 is the E-batch
itself, a multinomial row a bootstrap draw, so one matrix product gives every replicate at once.

With a_i = h_i (Σ_t H_t or -S_i) and d_i = 1 (per sequence) or L_i (per token), H = E[a] / E[d]:

* first order, slope H'(0) = ⟨∇H, v⟩ per sequence (math.md), causal reverse sums G_k = Σ_{t>k} H_t
  with leave-one-out position baselines b_k, so every term is unbiased:
      rb:        s_i = Σ_t dH_t + Σ_k (G_k - b_k) dlp_k        surprisal: s_i = -(S_i - b_i) dS_i
      per token: (mean s - H · mean (L_i - b_i) dS_i) / mean L
  δH₁(η) = η · slope.
* SNIS: ΔH_snis(η) = Σ c w a(θ+ηv) / Σ c w d - Σ c a / Σ c d,  w = exp(S_{θ+ηv} - S_θ).
* its linearisation on the same samples, the exact η-derivative of that estimator at 0:
      ΔH_snis'(0) = [Σ c (da + a dS)] / Σ c d - [Σ c a][Σ c d dS] / (Σ c d)²
  so R(η) = ΔH_snis(η) - η ΔH_snis'(0) is SNIS's O(η²) remainder: the nonlinearity
  ΔH(η) - η H'(0), estimated on shared samples (its linear noise cancels exactly).
* the ground truth (control variate): ΔH_cv(η) = η · slope + R(η). Both η·slope and
  η ΔH_snis'(0) estimate η H'(0); replacing SNIS's noisy whole-sequence linear term (a covariance
  of h with the whole-sequence score) by the causal one removes most of SNIS's noise, and R keeps
  everything beyond first order. Unbiased up to SNIS's O(η²/N) ratio bias (measured in the tests).
Intervals: normal, estimate ± 1.96 · bootstrap standard deviation over the E-batch's prompts
(`cluster_counts`: with several responses per prompt the prompt is the independent unit).
δH₁'s relative error -R(η) / ΔH(η) gets Fieller's interval from the joint replicates
(`RatioInterval`), valid also where ΔH's own interval holds zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


def pad(rows: list[np.ndarray], width: int | None = None) -> np.ndarray:
    """Ragged 1-D arrays -> (N, T) float64, zero-padded on the right."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclass
class TokenArrays:
    """The E-batch at θ, padded (N, T): mask, H_t, log π(y_t)."""

    mask: np.ndarray
    entropy: np.ndarray
    logprob: np.ndarray

    @classmethod
    def from_lists(cls, entropy: list[np.ndarray], logprob: list[np.ndarray]) -> TokenArrays:
        mask = pad([np.ones(len(e)) for e in entropy])
        return cls(mask, pad(entropy, mask.shape[1]), pad(logprob, mask.shape[1]))

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(1)

    def values(self, estimator: str) -> np.ndarray:
        """h_i: Σ_t H_t (rb) or -S_i (surprisal)."""
        if estimator == "rb":
            return self.entropy.sum(1)
        if estimator == "surprisal":
            return -self.logprob.sum(1)
        raise ValueError(f"unknown estimator '{estimator}'; available: rb, surprisal")

    def denominators(self, per_token: bool) -> np.ndarray:
        return self.lengths if per_token else np.ones(len(self.mask))


@dataclass
class Tangent:
    """Directional derivatives (N, T) of H_t and log π(y_t) along one direction."""

    d_entropy: np.ndarray
    d_logprob: np.ndarray

    @classmethod
    def from_lists(cls, d_entropy: list[np.ndarray], d_logprob: list[np.ndarray], width: int):
        return cls(pad(d_entropy, width), pad(d_logprob, width))

    def values(self, estimator: str) -> np.ndarray:
        """dh_i, the pathwise derivative of h_i on the fixed sequence."""
        return self.d_entropy.sum(1) if estimator == "rb" else -self.d_logprob.sum(1)

    @property
    def score(self) -> np.ndarray:
        """dS_i = ⟨∇ log π(y_i), v⟩, zero mean under π_θ."""
        return self.d_logprob.sum(1)


def resample_counts(n: int, reps: int, seed: int) -> np.ndarray:
    """(1 + reps, n) counts: row 0 is the sample itself, then `reps` bootstrap draws."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)
    return np.vstack([np.ones((1, n)), draws])


def _loo(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Leave-one-out mean of `values` (N,) per resample and sequence, (R, N): the mean over the
    other draws (a drawn duplicate of i counts as another draw)."""
    total, n = counts @ values, counts.sum(1)
    return (total[:, None] - values[None, :]) / np.maximum(n[:, None] - 1, 1)


def first_order_slope(
    arrays: TokenArrays, tangent: Tangent, counts: np.ndarray, estimator: str, per_token: bool
) -> np.ndarray:
    """H'(0) = ⟨∇H, v⟩ per resample (R,), causal form with leave-one-out baselines."""
    m, dlp = arrays.mask, tangent.d_logprob * arrays.mask
    n = counts.sum(1)  # (R,)
    d_score = tangent.score
    if estimator == "rb":
        e = arrays.entropy * m
        g = np.cumsum(e[:, ::-1], 1)[:, ::-1] - e  # G_k = Σ_{t>k} H_t, (N, T)
        # Baseline b_ik: mean of G_jk over the other draws j still running at position k.
        num, den = counts @ (g * m), counts @ m  # (R, T)
        inv = np.where(den > 1, 1.0 / np.maximum(den - 1, 1), 0.0)  # no other draw: b = 0
        own = tangent.d_entropy.sum(1) + (g * dlp).sum(1)  # (N,) Σ dH + Σ G dlp
        total = (
            counts @ own
            - ((num * inv) * (counts @ dlp)).sum(1)
            + (inv * (counts @ (g * dlp))).sum(1)
        )
    elif estimator == "surprisal":
        s = arrays.logprob.sum(1)
        b = _loo(counts, s)  # (R, N)
        total = -(counts * (s[None, :] - b) * d_score[None, :]).sum(1)
    else:
        raise ValueError(f"unknown estimator '{estimator}'; available: rb, surprisal")
    slope = total / n
    if per_token:
        lengths = arrays.lengths
        h = arrays.values(estimator)
        mean_len = counts @ lengths / n
        value = (counts @ h) / (counts @ lengths)
        b_len = _loo(counts, lengths)
        d_len = (counts * (lengths[None, :] - b_len) * d_score[None, :]).sum(1) / n
        slope = (slope - value * d_len) / mean_len
    return slope


def snis(
    a_old: np.ndarray,
    a_new: np.ndarray,
    log_ratio: np.ndarray,
    d: np.ndarray,
    counts: np.ndarray,
    clip: float | None = None,
) -> np.ndarray:
    """ΔH_snis per resample (R,); `clip` caps w at clip x its (resample) mean."""
    w = np.exp(log_ratio - log_ratio.max())
    if clip is None:
        new = (counts @ (w * a_new)) / (counts @ (w * d))
    else:
        cap = clip * (counts @ w) / counts.sum(1)  # (R,)
        wc = counts * np.minimum(w[None, :], cap[:, None])  # (R, N)
        new = (wc @ a_new) / (wc @ d)
    return new - (counts @ a_old) / (counts @ d)


def snis_slope(
    a: np.ndarray, da: np.ndarray, d_score: np.ndarray, d: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """The η-derivative at 0 of the SNIS estimator on the same samples, per resample (R,)."""
    sd = counts @ d
    return (counts @ (da + a * d_score)) / sd - (counts @ a) * (counts @ (d * d_score)) / sd**2


def covariance_predictor(
    logprob_sum, n_tokens, d_logprob_sum, advantages, counts: np.ndarray
) -> np.ndarray:
    """Cui et al. (2025, arXiv 2505.22617), per-token entropy change per unit step, (R,).

    Tabular softmax under natural PG moves log π(a|s) by κ (A(s,a) - E_π A) and changes the
    entropy at s by -κ Cov_{a~π}(log π(a|s), A(s,a)). Over the U-batch's tokens (each carrying
    its sequence's advantage A_i): C = Cov_tokens(log π(y_t), A_t), and κ the least-squares slope
    of the tokens' log-prob change along the update (dlp_t) on A_t - Ā, i.e. the step's size in
    logit space as the network and Adam realise it. Inputs are per sequence (Σ_t log π, L_i,
    Σ_t dlp_t, A_i); `counts` (R, N_U) resamples sequences (whole groups, for group advantages).
    """
    lp, n_tok = np.asarray(logprob_sum, float), np.asarray(n_tokens, float)
    dlp, adv = np.asarray(d_logprob_sum, float), np.asarray(advantages, float)
    n = counts @ n_tok
    mean_lp, mean_a = counts @ lp / n, counts @ (n_tok * adv) / n
    cov = counts @ (adv * lp) / n - mean_lp * mean_a
    centred = adv[None, :] - mean_a[:, None]
    spread = (counts * n_tok * centred**2).sum(1)
    # Equal advantages (no learning signal): Cov = 0 and the predicted change is 0, not 0/0.
    kappa = np.divide(
        (counts * centred * dlp).sum(1), spread, out=np.zeros_like(spread), where=spread > 0
    )
    return -kappa * cov


def ess(log_ratio: np.ndarray) -> float:
    w = np.exp(log_ratio - log_ratio.max())
    return float(w.sum() ** 2 / (w**2).sum())


def clipped_fraction(log_ratio: np.ndarray, clip: float | None) -> float:
    if clip is None:
        return 0.0
    w = np.exp(log_ratio - log_ratio.max())
    return float((w > clip * w.mean()).mean())


def interval(replicates: np.ndarray) -> tuple[float, float, float, float]:
    """(estimate, standard error, lower, upper): row 0 the estimate, rows 1: bootstrap replicates."""
    est, se = float(replicates[0]), float(np.std(replicates[1:], ddof=1))
    return est, se, est - Z95 * se, est + Z95 * se


def cluster_counts(cluster: np.ndarray, reps: int, seed: int) -> np.ndarray:
    """(1 + reps, N) counts per sequence that resample whole clusters (a prompt's responses):
    sequences of one prompt are not independent, so the bootstrap draws prompts."""
    cluster = np.asarray(cluster)
    ids, index = np.unique(cluster, return_inverse=True)
    return resample_counts(len(ids), reps, seed)[:, index]


@dataclass
class RatioInterval:
    """Fieller's 95% confidence set for ρ = num / den from joint replicates: the ρ with
    (num - ρ den)² <= z² Var(num - ρ den), i.e. a ρ² + b ρ + c <= 0. It stays valid where den's
    interval holds zero (the set is then unbounded), which a percentile interval of the ratio is not."""

    estimate: float
    a: float
    b: float
    c: float

    @classmethod
    def from_replicates(cls, num: np.ndarray, den: np.ndarray) -> RatioInterval:
        n, d = float(num[0]), float(den[0])
        cov = np.cov(num[1:], den[1:])  # bootstrap (co)variances
        z2 = Z95**2
        return cls(
            n / d if d != 0 else np.nan,
            d * d - z2 * cov[1, 1],
            -2 * (n * d - z2 * cov[0, 1]),
            n * n - z2 * cov[0, 0],
        )

    def contains(self, rho: float) -> bool:
        return self.a * rho * rho + self.b * rho + self.c <= 0

    @property
    def bounds(self) -> tuple[float, float]:
        """(lower, upper) where the set is a bounded interval, else (nan, nan)."""
        disc = self.b * self.b - 4 * self.a * self.c
        if not (self.a > 0 and disc >= 0):
            return np.nan, np.nan
        root = np.sqrt(disc)
        return (-self.b - root) / (2 * self.a), (-self.b + root) / (2 * self.a)

    def verdict(self, tolerance: float = 0.2) -> str:
        """`confirmed`: the set lies inside ±tolerance; `rejected`: it misses ±tolerance entirely."""
        lo, hi = self.bounds
        if -tolerance <= lo and hi <= tolerance:
            return "confirmed"
        q = [self.a * r * r + self.b * r + self.c for r in (-tolerance, tolerance)]
        if self.a > 0 and abs(self.b / (2 * self.a)) < tolerance:  # the vertex lies inside
            q.append(self.c - self.b * self.b / (4 * self.a))
        if all(np.isfinite(q)) and min(q) > 0:
            return "rejected"
        return "undecided"

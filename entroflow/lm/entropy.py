"""Exact full-vocabulary entropy and label log-probs from logits, with bounded memory.

Convention (recorded in every output file): p = softmax(logits / T), before any top-p / top-k
truncation, entropies in nats. `entropy_and_logprob` is row-chunked: each chunk is upcast to
fp32 (or fp64) on its own, so the peak extra memory is [chunk_rows, V] in the accumulation
dtype, never [tokens, V]. On CUDA the scorer skips logits altogether (`fused_entropy.py`, the
same r/b form streamed over vocabulary tiles).
"""

from __future__ import annotations

import torch

ENTROPY_CONVENTION = "softmax(logits / temperature), full vocabulary, before top-p/top-k; nats"


def _scaled(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for entropy scoring, got {temperature}")
    z = logits.to(dtype)
    return z if temperature == 1.0 else z / temperature


def _entropy_logprob_rows(
    z: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z: (R, V) already scaled and upcast. Returns H (R,), log p(label) (R,) or None.

    With m the row max, d = z - m, r = Σ e^d - 1 and b = Σ d e^d: H = log1p(r) - b / (1 + r),
    log Z = m + log1p(r). The 1 of the max entries is counted exactly (d == 0) rather than
    summed and subtracted, so near-deterministic rows keep their relative accuracy (-Σ p log p
    rounds p_top to 1 and loses the top token's share once r is below the epsilon); and nothing
    cancels against log Z ~ 30. The fused GPU kernel uses the same form.
    """
    m = z.max(dim=-1, keepdim=True).values  # (R, 1)
    d = z - m  # (R, V), <= 0; -inf stays -inf
    e = d.exp()
    at_max = d == 0
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    r = torch.where(at_max, zero, e).sum(-1) + (at_max.sum(-1).to(z.dtype) - 1)  # (R,)
    b = torch.where(e > 0, d * e, zero).sum(-1)  # 0 · -inf := 0
    log_s = torch.log1p(r)
    entropy = log_s - b / (1 + r)
    logprob = None
    if labels is not None:
        logprob = d.gather(-1, labels[:, None]).squeeze(-1) - log_s
    return entropy, logprob


def entropy_and_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
    accum_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy and label log-prob for every row of `logits` (..., V).

    Returns tensors of shape `logits.shape[:-1]` in `accum_dtype` (logprob is None without labels).
    """
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_labels = None if labels is None else labels.reshape(-1)
    n = flat.shape[0]
    entropy = torch.empty(n, dtype=accum_dtype, device=logits.device)
    logprob = None if labels is None else torch.empty(n, dtype=accum_dtype, device=logits.device)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        z = _scaled(flat[start:stop], temperature, accum_dtype)
        chunk_labels = None if flat_labels is None else flat_labels[start:stop]
        h, lp = _entropy_logprob_rows(z, chunk_labels)
        entropy[start:stop] = h
        if logprob is not None:
            logprob[start:stop] = lp
    return entropy.reshape(lead), None if logprob is None else logprob.reshape(lead)

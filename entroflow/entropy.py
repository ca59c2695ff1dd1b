"""Exact full-vocabulary entropy and label log-probs from logits, with bounded memory.

Convention (recorded in every output file): p = softmax(logits / T), before any top-p / top-k
truncation, entropies in nats. Two equivalent forms:

- `entropy_and_logprob`: row-chunked; each chunk is upcast to fp32 (or fp64) on its own, so the
  peak extra memory is [chunk_rows, V] in the accumulation dtype, never [tokens, V].
- `streaming_entropy_and_logprob`: one pass over vocabulary tiles keeping three running values
  per row (max m, s = Σ e^{z-m}, b = Σ z·e^{z-m}); the form a fused GPU kernel uses.
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


def streaming_entropy_and_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    vocab_tile: int = 8192,
    accum_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same values as `entropy_and_logprob`, computed in one pass over vocabulary tiles.

    Running values per row: m (max), s = Σ e^{z-m}, b = Σ z·e^{z-m}; when m grows both are
    rescaled by e^{m_old - m_new}. Then log Z = m + log s, H = log Z - b/s.
    """
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    n, vocab = flat.shape
    dev = logits.device
    m = torch.full((n,), float("-inf"), dtype=accum_dtype, device=dev)
    s = torch.zeros(n, dtype=accum_dtype, device=dev)
    b = torch.zeros(n, dtype=accum_dtype, device=dev)
    label_z = None
    if labels is not None:
        flat_labels = labels.reshape(-1)
        label_z = _scaled(
            flat.gather(-1, flat_labels[:, None]).squeeze(-1), temperature, accum_dtype
        )
    for start in range(0, vocab, vocab_tile):
        z = _scaled(flat[:, start : start + vocab_tile], temperature, accum_dtype)  # (N, tile)
        m_new = torch.maximum(m, z.max(-1).values)
        # Rows whose max is still -inf have s = b = 0; keep the rescale finite for them.
        safe_m_new = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale = torch.where(torch.isfinite(m), torch.exp(m - safe_m_new), torch.zeros_like(m))
        e = torch.exp(z - safe_m_new[:, None])  # (N, tile), 0 where z = -inf
        ez = torch.where(e > 0, e * z, torch.zeros((), dtype=accum_dtype, device=dev))
        s = s * scale + e.sum(-1)
        b = b * scale + ez.sum(-1)
        m = m_new
    log_z = m + torch.log(s)
    entropy = log_z - b / s
    logprob = None if label_z is None else (label_z - log_z).reshape(lead)
    return entropy.reshape(lead), logprob

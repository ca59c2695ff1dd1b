"""Exact full-vocabulary entropy and label log-probs from logits, with bounded memory; and the map
of every place the project computes a token entropy.

Convention (recorded in every output file): p = softmax(logits / T), before any top-p / top-k
truncation, entropies in nats. `entropy_and_logprob` is row-chunked: each chunk is upcast to
fp32 (or fp64) on its own, so the peak extra memory is [chunk_rows, V] in the accumulation
dtype, never [tokens, V]. On CUDA the scorer skips logits altogether (`fused_entropy.py`, the
same r/b form streamed over vocabulary tiles).

Which path serves which caller. All paths use the r/b form of `_entropy_logprob_rows` (exact to
the accumulation dtype's relative accuracy, near-deterministic tokens included):

1. Reference, from logits: `entropy_and_logprob` here (fp32 or fp64 accumulation, any device).
   Callers: the chunked head (2), the `generate` path's recorder (`engines.hf._EntropyRecorder`,
   fp32), the forking-temperature warper (`engines.hf.ForkingTemperatureWarper`, fp32 at the
   base temperature, on every decoder), and the static decoder's sampler off CUDA
   (`engines.static_decode.make_sampler`). Tested against float64 log-softmax, extreme and
   near-deterministic rows, chunk-size invariance (tests/unit/test_entropy.py).
2. The LM head, from hidden states: `lm.scoring.head_entropy_and_logprob`, reached through
   `lm.scoring.batch_scores`. `choose_head_method` picks, per call, (3) on CUDA when no gradient
   is needed, the accumulation is fp32 and the head is a plain bias-free Linear; otherwise the
   chunked head: head logits in `chunk_rows` row blocks, each through (1). Callers: the scorer
   (`score_responses`, fp32: `score_entropy`'s files), the trainer's sequence log-probs
   (`estimators.delta_h.score_sequences`, fp32, no grad), the δH probe of `training.monitor`
   (fp32; with grad, so chunked, when the probe is on), the ΔH stage's entropies and gradients
   (`score_sequences` at the stage's `accum_dtype`, default fp64: chunked) and the Fisher
   kernel's per-sequence gradients (`estimators.fisher`, fp64 log-probs with grad: chunked).
   The chunked head is tested against an unpadded float64 forward across padding, batching,
   chunk sizes and families with scaled or soft-capped logits (tests/unit/test_scoring.py);
   `check_head` compares the head with the model's own logits once per model, at run time.
3. The fused head, Triton: `lm.fused_entropy.fused_entropy_and_logprob` (fp32, no logits made),
   the CUDA choice of (2). Tested through Triton's interpreter on CPU against float64 and
   against the chunked head, and at a Qwen-sized shape on CUDA (tests/unit/test_fused_entropy.py).
4. Row kernel over existing logits, Triton: `lm.fused_entropy.logits_entropy` (fp32; the static
   decoder's recorder on CUDA when the one-read sampler is not used: top-k, top-p, forking) and
   `sample_with_entropy` (fp32 draw, log-prob and entropy in one read; plain-temperature
   sampling on CUDA). Tested in tests/unit/test_fused_entropy.py (against float64, masked
   tokens, the draw's distribution) and end to end in tests/unit/test_static_decode.py, where
   the engine's recorded entropies and log-probs equal the scorer's and `generate`'s.

The engines' recorded entropies (`SamplingParams.record_entropy`) serve benchmarks and tests;
the workflow's entropies come from the scorer (2, chunked or fused). Every scored file also
stores the scorer's agreement, on its first few responses, with `tokens.pipeline.reference_scores`
(an unbatched float64 forward and log-softmax), a path independent of all of the above.
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

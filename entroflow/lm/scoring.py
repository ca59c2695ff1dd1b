"""Teacher-forced scoring: exact per-token entropy and log-prob of given responses.

One pass through a Hugging Face causal LM per token-budgeted batch. Only the hidden states that
predict response tokens go through the LM head: on CUDA by the fused Triton kernel
(`fused_entropy.py`, no logits at all), elsewhere in row chunks, so the peak extra memory is
[chunk_rows, V] regardless of how long the responses are. Batches (`batching.py`) are
left-padded with position ids = cumsum(attention_mask) - 1, which is what `generate` uses;
without it the values drift from the sampling distribution.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from entroflow.journal import BatchJournal, load_or_compute
from entroflow.lm.batching import (
    left_pad,
    pair_batches,
    response_rows,
    split_by_lengths,
    token_budget_batches,  # noqa: F401 (estimators.delta_h, training.monitor import it from here)
)
from entroflow.lm.entropy import entropy_and_logprob
from entroflow.lm.fused_entropy import INT32_LIMIT, fused_entropy_and_logprob, fused_supported


@dataclass
class ScoredResponse:
    entropy: np.ndarray  # float32 [L]
    logprob: np.ndarray  # float32 [L]


def decoder_body(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its LM head (Qwen/Llama: `model.model`)."""
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None:
        raise TypeError(f"cannot find the decoder body of {type(model).__name__}")
    return body


def logit_scale(model: torch.nn.Module) -> float:
    """The factor some families put on the head's output: Cohere's `logit_scale` (times),
    Granite's `logits_scaling` (divided by). 1.0 for the others."""
    config = model.config
    return float(getattr(config, "logit_scale", None) or 1.0) / float(
        getattr(config, "logits_scaling", None) or 1.0
    )


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on (R, H) hidden rows -> (R, V) logits, as the model's own forward makes them
    (output scaling and final soft-capping included; `check_head` verifies that per model)."""
    logits = model.get_output_embeddings()(hidden)
    scale = logit_scale(model)
    if scale != 1.0:
        logits = logits * scale
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


_CHECKED_HEADS: weakref.WeakSet = weakref.WeakSet()


def check_head(lm: torch.nn.Module) -> None:
    """Once per model: body + `head_logits` must give the model's own logits on a few tokens.

    Every entropy in the project goes through this head; a family that transforms its logits in
    a way we do not reproduce (a new multiplier, say) fails here, loudly, instead of yielding the
    entropy of a different distribution.
    """
    if lm in _CHECKED_HEADS:
        return
    device = next(lm.parameters()).device
    ids = torch.arange(1, 9, device=device)[None] % lm.config.vocab_size  # (1, 8)
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            theirs = lm(input_ids=ids).logits.float()
            ours = head_logits(lm, decoder_body(lm)(input_ids=ids).last_hidden_state).float()
    finally:
        lm.train(was_training)
    error = float((ours - theirs).abs().max())
    if error > 1e-2 * float(theirs.abs().max()) + 1e-4:
        raise ValueError(
            f"{type(lm).__name__}: entroflow's LM head does not reproduce the model's logits "
            f"(max difference {error:.3g}); its forward transforms the logits in a way the scorer "
            "does not know, so its entropies would be wrong. This model family is not supported."
        )
    _CHECKED_HEADS.add(lm)


HEAD_METHODS = ("auto", "fused", "chunked")


def fusable_head_weight(lm: torch.nn.Module) -> torch.Tensor | None:
    """The unembedding (V, H) when logits are exactly hidden @ weightᵀ (a bias-free Linear head,
    no output scaling, no soft-capping), else None."""
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(lm.config, "final_logit_softcapping", None) or logit_scale(lm) != 1.0:
        return None
    return head.weight


def choose_head_method(
    lm: torch.nn.Module,
    device: torch.device,
    method: str = "auto",
    accum_dtype: torch.dtype = torch.float32,
    needs_grad: bool = False,
) -> str:
    """'fused' or 'chunked'. 'auto' fuses on CUDA when nothing needs gradients or fp64."""
    if method not in HEAD_METHODS:
        raise ValueError(f"unknown head method '{method}'; choose one of {', '.join(HEAD_METHODS)}")
    if method == "chunked":
        return method
    reasons = []
    weight = fusable_head_weight(lm)
    if weight is None:
        reasons.append("the LM head is not a plain bias-free Linear (no scaling, soft-capping)")
    elif weight.numel() >= INT32_LIMIT:
        reasons.append(f"the unembedding {tuple(weight.shape)} exceeds the kernel's int32 offsets")
    if needs_grad:
        reasons.append("gradients are needed (the kernel has no backward)")
    if accum_dtype != torch.float32:
        reasons.append(f"accumulation in {accum_dtype} was asked for (the kernel is fp32)")
    if not fused_supported(device):
        reasons.append(f"tensors are on {device.type} (the kernel needs CUDA + triton)")
    if method == "auto":
        return "chunked" if reasons or device.type != "cuda" else "fused"
    if reasons:
        raise ValueError("head method 'fused' is not possible here: " + "; ".join(reasons))
    return "fused"


def head_entropy_and_logprob(
    lm: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
    accum_dtype: torch.dtype = torch.float32,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and log p(label) (R,) of the LM head applied to hidden rows (R, H)."""
    chosen = choose_head_method(lm, hidden.device, method, accum_dtype, hidden.requires_grad)
    if chosen == "fused":
        return fused_entropy_and_logprob(
            hidden.contiguous(), fusable_head_weight(lm), labels, temperature=temperature
        )
    entropies, logprobs = [], []
    for start in range(0, len(hidden), chunk_rows):
        logits = head_logits(lm, hidden[start : start + chunk_rows])  # (chunk, V) in model dtype
        h, lp = entropy_and_logprob(
            logits,
            labels[start : start + chunk_rows],
            temperature=temperature,
            accum_dtype=accum_dtype,
        )
        entropies.append(h)
        logprobs.append(lp)
    if not entropies:
        empty = hidden.new_zeros(0, dtype=accum_dtype)
        return empty, empty
    return torch.cat(entropies), torch.cat(logprobs)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """A PEFT-wrapped model's underlying LM, with its adapters still active."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def batch_scores(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
    accum_dtype: torch.dtype = torch.float32,
    head_method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and log-prob (R,) of all response tokens of one batch, concatenated in order.

    Differentiable when called with grad enabled (the probe and the ΔH stage use that; 'auto'
    then takes the chunked head); the caller chooses the batch. Responses must be non-empty.
    """
    lm = unwrap_peft(model)
    check_head(lm)
    device = next(lm.parameters()).device
    seqs = [
        np.concatenate([np.asarray(p, dtype=np.int64), np.asarray(r, dtype=np.int64)])
        for p, r in zip(prompts, responses, strict=True)
    ]  # numpy, not Python lists: ~10 ms per 100k tokens of host time saved
    ids, mask, positions = (t.to(device) for t in left_pad(seqs, pad_token_id))
    hidden = decoder_body(lm)(
        input_ids=ids, attention_mask=mask, position_ids=positions
    ).last_hidden_state
    rows, cols = response_rows([len(r) for r in responses], ids.shape[1])
    rows, cols = rows.to(device), cols.to(device)
    selected = hidden[rows, cols]  # (R, H): only rows that predict a response token
    labels = ids[rows, cols + 1]  # (R,)
    return head_entropy_and_logprob(
        lm,
        selected,
        labels,
        temperature=temperature,
        chunk_rows=chunk_rows,
        accum_dtype=accum_dtype,
        method=head_method,
    )


def _check_pairs(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if any(len(p) < 1 for p in prompts):
        raise ValueError("each prompt needs at least one token to predict the response from")


def _scores_on_host(model, prompts, responses, **head) -> dict[str, np.ndarray]:
    """`batch_scores` as float32 numpy arrays, the form a journal saves."""
    entropy, logprob = batch_scores(model, prompts, responses, **head)
    return {"entropy": entropy.float().cpu().numpy(), "logprob": logprob.float().cpu().numpy()}


@torch.inference_mode()
def score_responses(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    temperature: float = 1.0,
    max_tokens_per_batch: int = 16384,
    chunk_rows: int = 1024,
    accum_dtype: torch.dtype = torch.float32,
    head_method: str = "auto",
    progress: Callable[[int, int, float], None] | None = None,
    journal: BatchJournal | None = None,
) -> list[ScoredResponse]:
    """Entropy and log-prob of every response token under softmax(logits / temperature).

    `progress(done_tokens, total_tokens, seconds)` is called after each batch. With a `journal`
    each batch's values are saved as soon as they exist and saved batches are not recomputed
    (the batch plan depends only on the lengths and the token budget).
    """
    _check_pairs(prompts, responses)
    head = dict(
        pad_token_id=pad_token_id,
        temperature=temperature,
        chunk_rows=chunk_rows,
        accum_dtype=accum_dtype,
        head_method=head_method,
    )
    empty = np.zeros(0, dtype=np.float32)
    results = [ScoredResponse(empty, empty) for _ in prompts]
    total = sum(len(r) for r in responses)
    done, t0 = 0, time.perf_counter()
    for index, batch in enumerate(pair_batches(prompts, responses, max_tokens_per_batch)):
        scored = [i for i in batch if len(responses[i])]
        if not scored:
            continue
        saved = load_or_compute(
            journal,
            index,
            functools.partial(
                _scores_on_host,
                model,
                [prompts[i] for i in scored],
                [responses[i] for i in scored],
                **head,
            ),
        )
        lengths = [len(responses[i]) for i in scored]
        pieces = zip(
            split_by_lengths(saved["entropy"], lengths),
            split_by_lengths(saved["logprob"], lengths),
            strict=True,
        )
        for i, (entropy, logprob) in zip(scored, pieces, strict=True):
            results[i] = ScoredResponse(entropy, logprob)
        done += sum(lengths)
        if progress is not None:
            progress(done, total, time.perf_counter() - t0)
    return results

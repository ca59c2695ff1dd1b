"""Teacher-forced scoring: exact per-token entropy and log-prob of given responses.

One pass through a Hugging Face causal LM per token-budgeted batch. Only the hidden states that
predict response tokens go through the LM head: on CUDA by the fused Triton kernel
(`fused_entropy.py`, no logits at all), elsewhere in row chunks, so the peak extra memory is
[chunk_rows, V] regardless of how long the responses are. Batches are left-padded with
position ids = cumsum(attention_mask) - 1, which is what `generate` uses; without it the values
drift from the sampling distribution.
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
from entroflow.lm.entropy import entropy_and_logprob
from entroflow.lm.fused_entropy import INT32_LIMIT, fused_entropy_and_logprob, fused_supported


@dataclass
class ScoredResponse:
    entropy: np.ndarray  # float32 [L]
    logprob: np.ndarray  # float32 [L]


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices so that len(batch) * longest <= max_tokens (a single long one may exceed).

    Sorted longest first so padding is small and an out-of-memory shows up on the first batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns input_ids, attention_mask, position_ids, each (B, T)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


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


def response_rows(response_lens: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of the positions whose output predicts each response token.

    Sequence b is left-padded to `width`; its response token j sits at column
    width - L_b + j and is predicted by the column before it.
    """
    rows, cols = [], []
    for b, n in enumerate(response_lens):
        start = width - n - 1  # predicts the first response token
        rows.append(torch.full((n,), b, dtype=torch.long))
        cols.append(torch.arange(start, start + n, dtype=torch.long))
    return torch.cat(rows), torch.cat(cols)


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


def _split_by_response(
    saved: dict[str, np.ndarray], lengths: Sequence[int]
) -> list[ScoredResponse]:
    """One batch's concatenated scores cut back into its responses of `lengths` tokens."""
    out, offset = [], 0
    for n in lengths:
        out.append(
            ScoredResponse(
                saved["entropy"][offset : offset + n], saved["logprob"][offset : offset + n]
            )
        )
        offset += n
    return out


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
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    total = sum(len(r) for r in responses)
    done, t0 = 0, time.perf_counter()
    for index, batch in enumerate(token_budget_batches(lengths, max_tokens_per_batch)):
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
        for i, result in zip(
            scored, _split_by_response(saved, [len(responses[i]) for i in scored]), strict=True
        ):
            results[i] = result
        done += sum(len(responses[i]) for i in scored)
        if progress is not None:
            progress(done, total, time.perf_counter() - t0)
    return results

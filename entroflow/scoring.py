"""Teacher-forced scoring: exact per-token entropy and log-prob of given responses.

One pass through a Hugging Face causal LM per token-budgeted batch. Only the hidden states that
predict response tokens go through the LM head, in row chunks, so the peak extra memory is
[chunk_rows, V] regardless of how long the responses are. Batches are left-padded with
position ids = cumsum(attention_mask) - 1, which is what `generate` uses; without it the values
drift from the sampling distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from entroflow.entropy import entropy_and_logprob


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
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def decoder_body(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its LM head (Qwen/Llama: `model.model`)."""
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None:
        raise TypeError(f"cannot find the decoder body of {type(model).__name__}")
    return body


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on (R, H) hidden rows -> (R, V) logits, with final soft-capping where the model has it."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def response_rows(
    prompt_lens: Sequence[int], response_lens: Sequence[int], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of the positions whose output predicts each response token.

    Sequence b is left-padded to `width`; its response token j sits at column
    width - L_b + j and is predicted by the column before it.
    """
    rows, cols = [], []
    for b, (p, n) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        start = width - n - 1  # predicts the first response token
        if p < 1:
            raise ValueError("each prompt needs at least one token to predict the response from")
        rows.append(torch.full((n,), b, dtype=torch.long))
        cols.append(torch.arange(start, start + n, dtype=torch.long))
    return torch.cat(rows), torch.cat(cols)


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
    progress: Callable[[int, int, float], None] | None = None,
) -> list[ScoredResponse]:
    """Entropy and log-prob of every response token under softmax(logits / temperature).

    `progress(done_tokens, total_tokens, seconds)` is called after each batch.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    body = decoder_body(model)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    results: list[ScoredResponse | None] = [None] * len(prompts)
    total = sum(len(r) for r in responses)
    done, t0 = 0, time.perf_counter()
    for batch in token_budget_batches(lengths, max_tokens_per_batch):
        scored = [i for i in batch if len(responses[i])]
        for i in batch:
            if not len(responses[i]):
                empty = np.zeros(0, dtype=np.float32)
                results[i] = ScoredResponse(empty, empty.copy())
        if not scored:
            continue
        seqs = [list(prompts[i]) + list(responses[i]) for i in scored]
        ids, mask, positions = (t.to(device) for t in left_pad(seqs, pad_token_id))
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        rows, cols = response_rows(
            [len(prompts[i]) for i in scored], [len(responses[i]) for i in scored], ids.shape[1]
        )
        rows, cols = rows.to(device), cols.to(device)
        selected = hidden[rows, cols]  # (R, H): only rows that predict a response token
        labels = ids[rows, cols + 1]  # (R,)
        entropy = torch.empty(len(rows), dtype=accum_dtype, device=device)
        logprob = torch.empty_like(entropy)
        for start in range(0, len(rows), chunk_rows):
            stop = start + chunk_rows
            logits = head_logits(model, selected[start:stop])  # (chunk, V) in model dtype
            h, lp = entropy_and_logprob(
                logits, labels[start:stop], temperature=temperature, accum_dtype=accum_dtype
            )
            entropy[start:stop], logprob[start:stop] = h, lp
        entropy_np = entropy.float().cpu().numpy()
        logprob_np = logprob.float().cpu().numpy()
        offset = 0
        for i in scored:
            n = len(responses[i])
            results[i] = ScoredResponse(
                entropy_np[offset : offset + n].copy(), logprob_np[offset : offset + n].copy()
            )
            offset += n
        done += offset
        if progress is not None:
            progress(done, total, time.perf_counter() - t0)
    return results  # type: ignore[return-value]

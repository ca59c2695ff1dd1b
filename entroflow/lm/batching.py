"""Batches of (prompt, response) token sequences, shared by the scorer, the engines and the
estimators: the token-budget plan, left padding with generate's position ids, the rows whose
outputs predict response tokens, and cutting a batch's concatenated per-token values back into
its responses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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


def pair_batches(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], max_tokens: int
) -> list[list[int]]:
    """`token_budget_batches` of (prompt, response) pairs by their whole length."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    return token_budget_batches(lengths, max_tokens)


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


def split_by_lengths(values, lengths: Sequence[int]) -> list:
    """Consecutive pieces of `lengths` rows of `values` (an array or tensor of Σ lengths rows,
    e.g. one batch's scores, responses concatenated): views, in order."""
    pieces, offset = [], 0
    for n in lengths:
        pieces.append(values[offset : offset + n])
        offset += n
    return pieces

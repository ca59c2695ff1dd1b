"""The per-checkpoint Fisher-kernel stage, on the ΔH stage's E- and U-batches and update.

1. Replay the update (same U-batch, same AdamW state) for P = 1 / D.
2. Stream √P ⊙ ∇S of every E and U sequence to an HDF5 gradient store, row batch by row batch
   (chunked by column blocks), and project each row with a seeded JL matrix on the way.
3. Accumulate K = G_E G_Uᵀ over column blocks read back from the store (peak memory: one block).
4. Check the reconstruction identity: K's coefficient-weighted row sums against the aggregate
   first-order δH (surprisal estimator, gradient part), and the sketch's error against K.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from entroflow.checkpoint.delta_h_run import RunShape, replay_step
from entroflow.estimators.adam import dot
from entroflow.estimators.delta_h import entropy_gradient, score_sequences
from entroflow.estimators.fisher import (
    flatten_blocks,
    jl_sketch,
    kernel_delta_h,
    sequence_gradients,
)
from entroflow.io import TokenTable
from entroflow.training.algorithms import loss_coefficients

log = logging.getLogger(__name__)


@dataclass
class FisherSettings:
    block: int = 65536  # parameter columns per block (peak memory ~ (N_E + N_U) x block x 4 bytes)
    gradient_dtype: str = "float32"  # float32 | float16 in the gradient store
    sketch_dim: int = 256  # JL dimension k (0: no sketch)
    seed: int = 0
    max_tokens_per_batch: int = 4096
    e_responses: int = 256  # evaluation sequences: the E-batch's first draws (one per prompt)


def batch_sequences(table: TokenTable, rows: np.ndarray | None = None):
    """(prompts, responses) token lists of a stored batch, optionally only some responses."""
    rows = np.arange(table.n_responses) if rows is None else rows
    prompts = [table.prompt_tokens(int(table["responses/prompt_index"][i])).tolist() for i in rows]
    responses = [table.response_tokens(int(i)).tolist() for i in rows]
    return prompts, responses


def stream_gradients(
    model, prompts, responses, names, sqrt_p, store: h5py.File, key: str, settings, pad, temperature
):
    """Write (N, D) √P ⊙ ∇S rows to store[key]; return the (N, k) JL sketch."""
    sizes = [int(np.prod(sqrt_p[n].shape)) for n in names]
    total = sum(sizes)
    dtype = np.float16 if settings.gradient_dtype == "float16" else np.float32
    ds = store.create_dataset(
        key,
        shape=(len(prompts), total),
        dtype=dtype,
        chunks=(min(len(prompts), 64), min(total, settings.block)),
    )
    sketch = np.zeros((len(prompts), settings.sketch_dim))
    for idx, grads in sequence_gradients(
        model,
        prompts,
        responses,
        names,
        pad_token_id=pad,
        temperature=temperature,
        max_tokens_per_batch=settings.max_tokens_per_batch,
    ):
        rows = flatten_blocks(grads, names, sqrt_p)  # (b, D) float64
        order = np.argsort(idx)
        idx_sorted = np.asarray(idx)[order]
        ds[idx_sorted.tolist()] = rows[order].numpy().astype(dtype)  # h5py needs increasing indices
        if settings.sketch_dim:
            for start in range(0, total, settings.block):
                sketch[idx] += jl_sketch(
                    rows[:, start : start + settings.block],
                    settings.sketch_dim,
                    settings.seed,
                    start,
                ).numpy()
    return sketch


def kernel_from_store(store: h5py.File, block: int) -> np.ndarray:
    e, u = store["e"], store["u"]
    k = np.zeros((e.shape[0], u.shape[0]))
    for start in range(0, e.shape[1], block):
        k += (
            e[:, start : start + block].astype(np.float64)
            @ u[:, start : start + block].astype(np.float64).T
        )
    return k


def fisher_kernel_stage(
    model,
    tokenizer,
    e_batch: TokenTable,
    u_batch: TokenTable,
    adam_state,
    run: RunShape,
    settings: FisherSettings,
    store_path: str | os.PathLike,
) -> tuple[dict, dict]:
    """Returns (datasets for kernel.h5, summary attributes). The gradient store stays at store_path."""
    t0 = time.perf_counter()
    pad = tokenizer.pad_token_id
    accum = torch.float64
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    kept = np.flatnonzero(u_batch["responses/kept"] == 1)
    advantages = u_batch["responses/advantage"][kept].astype(np.float64)
    u_prompts, u_responses = batch_sequences(u_batch, kept)
    # The ΔH stage may draw several responses per prompt; the kernel takes first draws only.
    e_rows = np.flatnonzero(e_batch["responses/sample_index"] == 0)[: settings.e_responses]
    e_prompts, e_responses = batch_sequences(e_batch, e_rows)
    step = replay_step(model, u_prompts, u_responses, advantages, run, adam_state, pad, accum)
    sqrt_p = {n: step.denominator[n].double().rsqrt() for n in names}

    # The aggregate first order (surprisal, gradient part) without the kernel.
    e_scores = score_sequences(
        model,
        e_prompts,
        e_responses,
        pad_token_id=pad,
        temperature=run.temperature,
        accum_dtype=accum,
    )
    ones = np.ones(len(e_prompts))
    grad_h = entropy_gradient(
        model, e_scores, ones, "surprisal", per_token=False, leave_one_out=True
    )
    aggregate = dot(grad_h, step.gradient_part)
    s_eval = np.array([float(lp.detach().sum()) for lp in e_scores.logprob])

    Path(store_path).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(store_path, "w") as store:
        sk_e = stream_gradients(
            model, e_prompts, e_responses, names, sqrt_p, store, "e", settings, pad, run.temperature
        )
        sk_u = stream_gradients(
            model, u_prompts, u_responses, names, sqrt_p, store, "u", settings, pad, run.temperature
        )
        t_grad = time.perf_counter() - t0
        kernel = kernel_from_store(store, settings.block)
        n_params = store["e"].shape[1]
    t_kernel = time.perf_counter() - t0 - t_grad

    state = adam_state[names[0]]
    beta1, t_next = state["betas"][0], float(state.get("step", 0)) + 1
    adam_factor = (1 - beta1) / (1 - beta1**t_next)
    u_lengths = np.array([len(r) for r in u_responses], dtype=np.float64)
    coefficients = loss_coefficients(advantages, u_lengths, run.algorithm, run.max_new_tokens)
    from_kernel, contributions = kernel_delta_h(
        torch.as_tensor(kernel), s_eval, coefficients, adam_factor
    )
    rel_error = abs(from_kernel - aggregate) / max(abs(aggregate), 1e-300)
    log.info(
        "reconstruction identity: kernel row sums %.6g vs aggregate δH₁ %.6g (relative error %.2e)",
        from_kernel,
        aggregate,
        rel_error,
    )

    sketch_kernel = sk_e @ sk_u.T if settings.sketch_dim else np.zeros_like(kernel)
    sketch_error = (
        float(np.linalg.norm(sketch_kernel - kernel) / max(np.linalg.norm(kernel), 1e-300))
        if settings.sketch_dim
        else float("nan")
    )
    e_pidx = e_batch["responses/prompt_index"][e_rows]
    u_pidx = u_batch["responses/prompt_index"][kept]
    datasets = {
        "K": kernel,
        "K_sketch": sketch_kernel,
        "e_dataset_index": e_batch["prompts/dataset_index"][e_pidx].astype(np.int32),
        "u_dataset_index": u_batch["prompts/dataset_index"][u_pidx].astype(np.int32),
        "e_length": np.array([len(r) for r in e_responses], dtype=np.int32),
        "u_length": u_lengths.astype(np.int32),
        "u_advantage": advantages,
        "u_reward": u_batch["responses/reward"][kept].astype(np.float64),
        "e_logprob_sum": s_eval,
        "u_contribution": contributions,
        "singular_values": np.linalg.svd(kernel, compute_uv=False),
    }
    summary = {
        "identity_from_kernel": from_kernel,
        "identity_aggregate": aggregate,
        "identity_relative_error": rel_error,
        "sketch_dim": settings.sketch_dim,
        "sketch_relative_error": sketch_error,
        "parameters": int(n_params),
        "gradient_seconds": t_grad,
        "kernel_seconds": t_kernel,
        "sequences_per_second": (len(e_prompts) + len(kept)) / max(t_grad, 1e-9),
    }
    return datasets, summary

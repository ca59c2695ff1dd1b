"""The per-checkpoint Fisher-kernel stage, on the ΔH stage's batches and stored update.

1. Read the ΔH file: E-batch first draws, the U-batch's kept sequences and advantages, Adam's
   D of the replayed step (P = 1 / D), and the first-order tangents along its gradient part.
2. Stream √P ⊙ ∇S of every E and U sequence to an HDF5 gradient store, row batch by row batch
   (chunked by column blocks), and sketch each sequence on the way: `sketch: factored` (default)
   projects each LoRA layer's per-sequence gradient on its own (`estimators.fisher_sketch`, the
   sketch that scales to 10⁴ x 10⁴ sequences), `jl` projects whole rows with one seeded matrix.
3. Accumulate K = G_E G_Uᵀ over column blocks read back from the store (peak memory: one block).
4. Check the reconstruction identity: K's coefficient-weighted row sums (backward mode, this
   stage) against the ΔH stage's δH₁ gradient part for the surprisal estimator on the same E
   sequences (forward mode); and the sketch's error against K (relative, and in cosine units).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from entroflow.checkpoint.delta_h_result import (
    DeltaHResult,
    fields_from_attributes,
    file_attributes,
)
from entroflow.checkpoint.detailed_log import FisherLog, rule_log_level
from entroflow.checkpoint.settings import FisherSettings, RunShape
from entroflow.estimators import delta_h_stats as st
from entroflow.estimators.fisher import (
    flatten_blocks,
    jl_sketch,
    kernel_delta_h,
    sequence_gradients,
)
from entroflow.estimators.fisher_sketch import FactoredSketch, cosine_error_rms
from entroflow.io import TokenTable, read_token_file, write_token_file
from entroflow.training.algorithms import loss_coefficients

log = logging.getLogger(__name__)
KERNEL_ARRAYS = (  # FisherResult's array fields: the file's root datasets, same names
    "K",
    "K_sketch",
    "e_dataset_index",
    "u_dataset_index",
    "e_length",
    "u_length",
    "u_advantage",
    "u_reward",
    "e_logprob_sum",
    "u_contribution",
    "singular_values",
)


@dataclass
class FisherResult:
    """fisher/checkpoint-{step}/kernel.h5: the kernel, its sequences' metadata, its checks."""

    K: np.ndarray  # (N_E, N_U) Adam-preconditioned Fisher kernel ⟨√P∇S_e, √P∇S_u⟩
    K_sketch: np.ndarray  # (N_E, N_U) the sketch's estimate of K (zeros without a sketch)
    e_dataset_index: np.ndarray  # (N_E,) problem row of each E sequence
    u_dataset_index: np.ndarray  # (N_U,)
    e_length: np.ndarray  # (N_E,) response tokens
    u_length: np.ndarray  # (N_U,)
    u_advantage: np.ndarray  # (N_U,)
    u_reward: np.ndarray  # (N_U,)
    e_logprob_sum: np.ndarray  # (N_E,) S(y) at θ
    u_contribution: np.ndarray  # (N_U,) each training sequence's share of the identity
    singular_values: np.ndarray  # (min(N_E, N_U),)
    identity_from_kernel: float  # δH₁'s gradient part per unit η (surprisal), from K's row sums
    identity_from_delta_h: float  # ... the ΔH stage's forward-mode value, same E sequences
    identity_relative_error: float
    sketch_dim: int  # numbers per sequence of the sketch
    sketch_relative_error: float  # ‖K_sketch - K‖ / ‖K‖ (NaN without a sketch)
    parameters: int  # columns of the gradient store (trainable parameters)
    gradient_seconds: float
    kernel_seconds: float
    sequences_per_second: float
    checkpoint: str = ""
    step: int = -1
    settings: dict = field(default_factory=dict)
    sketch_kind: str = ""  # factored | jl ("" without a sketch, or a file from before)
    sketch_cosine_error_rms: float = float("nan")  # RMS of |K_sketch - K| / (‖g‖‖g'‖)

    def write(self, path: str | os.PathLike) -> None:
        arrays = {k: getattr(self, k) for k in KERNEL_ARRAYS}
        attrs = file_attributes(self, set(KERNEL_ARRAYS))
        write_token_file(path, TokenTable(groups={"": arrays}, attrs=attrs))

    @classmethod
    def read(cls, path: str | os.PathLike) -> FisherResult:
        table = read_token_file(path, groups=[""])
        arrays = {k: table.groups[""][k] for k in KERNEL_ARRAYS}
        return cls(**arrays, **fields_from_attributes(cls, table.attrs))


def batch_sequences(table: TokenTable, rows: np.ndarray | None = None):
    """(prompts, responses) token lists of a stored batch, optionally only some responses."""
    rows = np.arange(table.n_responses) if rows is None else rows
    prompts = [table.prompt_tokens(int(table["responses/prompt_index"][i])).tolist() for i in rows]
    responses = [table.response_tokens(int(i)).tolist() for i in rows]
    return prompts, responses


def stream_gradients(
    model,
    prompts,
    responses,
    names,
    sqrt_p,
    store: h5py.File,
    key: str,
    settings,
    pad,
    temperature,
    factored: FactoredSketch | None = None,
):
    """Write (N, D) √P ⊙ ∇S rows to store[key]; return the (N, k) sketch (the factored one when
    given, else JL of `settings.sketch_dim`) and the rows' norms ‖√P ⊙ ∇S‖."""
    sizes = [int(np.prod(sqrt_p[n].shape)) for n in names]
    total = sum(sizes)
    dtype = np.float16 if settings.gradient_dtype == "float16" else np.float32
    stored = torch.float16 if settings.gradient_dtype == "float16" else torch.float32
    ds = store.create_dataset(
        key,
        shape=(len(prompts), total),
        dtype=dtype,
        chunks=(min(len(prompts), 64), min(total, settings.block)),
    )
    sketch = np.zeros((len(prompts), factored.dim if factored else settings.sketch_dim))
    norms = np.zeros(len(prompts))
    for idx, grads in sequence_gradients(
        model,
        prompts,
        responses,
        names,
        pad_token_id=pad,
        temperature=temperature,
        max_tokens_per_batch=settings.max_tokens_per_batch,
    ):
        rows = flatten_blocks(grads, names, sqrt_p)  # (b, D) float64, on the model's device
        order = np.argsort(idx)
        idx_sorted = np.asarray(idx)[order]
        host = rows[torch.as_tensor(order, device=rows.device)].to(stored).cpu().numpy()
        ds[idx_sorted.tolist()] = host  # h5py needs increasing indices
        norms[idx] = rows.norm(dim=1).cpu().numpy()
        if factored is not None:
            sketch[idx] = factored.from_gradients(grads).double().cpu().numpy()
        elif settings.sketch_dim:
            for start in range(0, total, settings.block):
                sketch[idx] += (
                    jl_sketch(
                        rows[:, start : start + settings.block],
                        settings.sketch_dim,
                        settings.seed,
                        start,
                    )
                    .cpu()
                    .numpy()
                )
    return sketch, norms


def kernel_from_store(store: h5py.File, block: int, details: FisherLog | None = None) -> np.ndarray:
    """K = G_E G_Uᵀ accumulated over column blocks (each block's share to `details`, if given)."""
    e, u = store["e"], store["u"]
    k = np.zeros((e.shape[0], u.shape[0]))
    for start in range(0, e.shape[1], block):
        part = (
            e[:, start : start + block].astype(np.float64)
            @ u[:, start : start + block].astype(np.float64).T
        )
        k += part
        if details is not None:
            details.kernel_block(start, part)
    return k


def identity_reference(e_batch: TokenTable, e_rows: np.ndarray) -> tuple[float, np.ndarray]:
    """The ΔH stage's first order along the update's gradient part for the surprisal estimator
    (leave-one-out baseline, per sequence) on the kernel's E sequences, and their S(y)."""
    logprob = [e_batch.response_tokens(int(i), "logprob").astype(np.float64) for i in e_rows]
    d_logprob = [e_batch.response_tokens(int(i), "d_logprob_gradient_part") for i in e_rows]
    arrays = st.TokenArrays.from_lists(logprob, logprob)  # the surprisal uses no entropies
    tangent = st.Tangent.from_lists(d_logprob, d_logprob, arrays.mask.shape[1])
    ones = np.ones((1, len(e_rows)))
    slope = st.first_order_slope(arrays, tangent, ones, "surprisal", per_token=False)
    return float(slope[0]), arrays.logprob.sum(1)


@dataclass
class KernelSequences:
    """The kernel's rows and columns: E first draws and kept U sequences, from the ΔH file."""

    e_rows: np.ndarray  # (N_E,) responses of the E-batch table
    u_rows: np.ndarray  # (N_U,) kept responses of the U-batch table
    e_prompts: list
    e_responses: list
    u_prompts: list
    u_responses: list

    @classmethod
    def from_delta_h(cls, delta_h: DeltaHResult, e_responses: int) -> KernelSequences:
        e_batch, u_batch = delta_h.e_batch, delta_h.u_batch
        u_rows = np.flatnonzero(u_batch["responses/kept"] == 1)
        # The ΔH stage may draw several responses per prompt; the kernel takes first draws only.
        e_rows = np.flatnonzero(e_batch["responses/sample_index"] == 0)[:e_responses]
        return cls(
            e_rows, u_rows, *batch_sequences(e_batch, e_rows), *batch_sequences(u_batch, u_rows)
        )


def preconditioner_sqrt(model, delta_h: DeltaHResult) -> dict[str, torch.Tensor]:
    """√P = D^(-1/2) per trainable parameter, D from the ΔH stage's replayed step."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = sorted(set(names) - set(delta_h.denominator))
    if missing:
        raise ValueError(
            f"the ΔH file has no update for {len(missing)} parameters, e.g. {missing[0]}"
        )
    return {n: torch.as_tensor(delta_h.denominator[n]).double().rsqrt() for n in names}


def factored_sketch(model, sqrt_p, settings) -> FactoredSketch | None:
    """The stage's factored sketch (exact √P, k = settings.sketch_side per projected side), or
    None for `sketch: jl` or no sketch."""
    if settings.sketch != "factored" or not settings.sketch_dim:
        return None
    side = settings.sketch_side
    return FactoredSketch(
        model,
        list(sqrt_p),
        k_in=side,
        k_out=side,
        seed=settings.seed,
        sqrt_p=sqrt_p,
        preconditioner="exact",
        dtype=torch.float64,
    )


def gradient_kernel(
    model, seqs: KernelSequences, sqrt_p, settings, pad, temperature, store_path, details=None
):
    """(K, E sketch, U sketch, parameters, gradient seconds, kernel seconds, E norms, U norms)."""
    t0 = time.perf_counter()
    names = list(sqrt_p)
    factored = factored_sketch(model, sqrt_p, settings)
    stream = dict(settings=settings, pad=pad, temperature=temperature, factored=factored)
    Path(store_path).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(store_path, "w") as store:
        sk_e, n_e = stream_gradients(
            model, seqs.e_prompts, seqs.e_responses, names, sqrt_p, store, "e", **stream
        )
        sk_u, n_u = stream_gradients(
            model, seqs.u_prompts, seqs.u_responses, names, sqrt_p, store, "u", **stream
        )
        t_grad = time.perf_counter() - t0
        kernel = kernel_from_store(store, settings.block, details)
        n_params = store["e"].shape[1]
    t_kernel = time.perf_counter() - t0 - t_grad
    return kernel, sk_e, sk_u, int(n_params), t_grad, t_kernel, n_e, n_u


def sketch_error(kernel: np.ndarray, sketch: np.ndarray | None) -> float:
    """‖K_sketch - K‖ / ‖K‖ (NaN without a sketch)."""
    if sketch is None:
        return float("nan")
    return float(np.linalg.norm(sketch - kernel) / max(np.linalg.norm(kernel), 1e-300))


def fisher_kernel_stage(
    model,
    tokenizer,
    delta_h: DeltaHResult,
    run: RunShape,
    settings: FisherSettings,
    store_path: str | os.PathLike,
    log_folder: str | os.PathLike | None = None,
) -> FisherResult:
    """The kernel of one checkpoint; the gradient store stays at store_path. With `log_folder`,
    the detailed logs that `settings.logging` asks for go there (checkpoint.detailed_log)."""
    details = FisherLog(log_folder, settings.logging)
    with rule_log_level(settings.logging):
        return _fisher_kernel_stage(model, tokenizer, delta_h, run, settings, store_path, details)


def _fisher_kernel_stage(model, tokenizer, delta_h, run, settings, store_path, details: FisherLog):
    e_batch, u_batch = delta_h.e_batch, delta_h.u_batch
    seqs = KernelSequences.from_delta_h(delta_h, settings.e_responses)
    sqrt_p = preconditioner_sqrt(model, delta_h)
    reference, s_eval = identity_reference(e_batch, seqs.e_rows)
    kernel, sk_e, sk_u, n_params, t_grad, t_kernel, n_e, n_u = gradient_kernel(
        model,
        seqs,
        sqrt_p,
        settings,
        tokenizer.pad_token_id,
        run.temperature,
        store_path,
        details if details.tensors else None,
    )
    advantages = u_batch["responses/advantage"][seqs.u_rows].astype(np.float64)
    u_lengths = np.array([len(r) for r in seqs.u_responses], dtype=np.float64)
    coefficients = loss_coefficients(advantages, u_lengths, run.algorithm, run.max_new_tokens)
    from_kernel, contributions = kernel_delta_h(
        torch.as_tensor(kernel), s_eval, coefficients, delta_h.adam_gradient_factor
    )
    rel_error = abs(from_kernel - reference) / max(abs(reference), 1e-300)
    log.info(
        "reconstruction identity: kernel row sums %.6g vs the ΔH stage's δH₁ %.6g (%.2e)",
        from_kernel,
        reference,
        rel_error,
    )
    sketch = sk_e @ sk_u.T if settings.sketch_dim else None
    e_pidx = e_batch["responses/prompt_index"][seqs.e_rows]
    u_pidx = u_batch["responses/prompt_index"][seqs.u_rows]
    result = FisherResult(
        K=kernel,
        K_sketch=np.zeros_like(kernel) if sketch is None else sketch,
        e_dataset_index=e_batch["prompts/dataset_index"][e_pidx].astype(np.int32),
        u_dataset_index=u_batch["prompts/dataset_index"][u_pidx].astype(np.int32),
        e_length=np.array([len(r) for r in seqs.e_responses], dtype=np.int32),
        u_length=u_lengths.astype(np.int32),
        u_advantage=advantages,
        u_reward=u_batch["responses/reward"][seqs.u_rows].astype(np.float64),
        e_logprob_sum=s_eval,
        u_contribution=contributions,
        singular_values=np.linalg.svd(kernel, compute_uv=False),
        identity_from_kernel=from_kernel,
        identity_from_delta_h=reference,
        identity_relative_error=rel_error,
        sketch_dim=0 if sketch is None else sk_e.shape[1],
        sketch_relative_error=sketch_error(kernel, sketch),
        sketch_kind="" if sketch is None else settings.sketch,
        sketch_cosine_error_rms=(
            float("nan") if sketch is None else cosine_error_rms(sketch, kernel, n_e, n_u)
        ),
        parameters=n_params,
        gradient_seconds=t_grad,
        kernel_seconds=t_kernel,
        sequences_per_second=(len(seqs.e_rows) + len(seqs.u_rows)) / max(t_grad, 1e-9),
    )
    if details.active:
        details.result(
            result,
            seqs,
            sqrt_p,
            (sk_e, sk_u),
            (n_e, n_u),
            np.asarray(coefficients, dtype=np.float64),
            (e_batch, u_batch),
            tokenizer,
        )
    return result

"""Entropy and label log-prob straight from hidden states and the unembedding, never making logits.

A Triton kernel computes z = (hidden @ weightᵀ) / T one (rows × vocab) tile at a time in fp32
registers and keeps three running values per row (`entropy.py` explains the streaming form):
m (max), r = Σ e^{z-m} - 1 (the sum without the max's own 1) and b = Σ (z-m)·e^{z-m}, plus the
label's z. Then H = log1p(r) - b/(1+r). Keeping b relative to m avoids the cancellation of
log Z - E[z] (log Z ~ 30 while half the tokens have H < 0.01), and keeping r apart from the 1
keeps the relative accuracy of entropies far below fp32's epsilon (near-deterministic tokens).

The vocabulary is cut into splits (one program per row block and split) so that the programs
running at the same time share one split of the unembedding, which then stays in L2; a tiny torch
step merges the splits' partial values. Peak extra memory: 16 bytes per row and split.

`TRITON_INTERPRET=1` runs the same kernel on CPU tensors (the tests do), slowly.
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton ships with CUDA builds of torch; on CPU it is only needed for the interpreter tests.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_supported(device: torch.device) -> bool:
    """Whether the fused kernel can run for tensors on `device`."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


if triton is not None:

    @triton.jit
    def _partials_kernel(
        hidden_ptr,  # (R, H)
        weight_ptr,  # (V, H)
        labels_ptr,  # (R,) int64; unused without labels
        m_ptr,  # (S, R) fp32 outputs: running max of z
        r_ptr,  # Σ e^{z-m} - 1
        b_ptr,  # Σ (z-m) e^{z-m}
        label_z_ptr,  # z of the label if it lies in this split, else 0
        R,
        V,
        H,
        inv_temperature,
        stride_hr,
        stride_hh,
        stride_wv,
        stride_wh,
        tiles_per_split,
        HAS_LABELS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        IEEE_FP32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)  # fastest: concurrent programs share one vocabulary split
        split = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        # Finite start so that rescaling never meets -inf * 0; every tile has a valid column.
        m = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        r = tl.zeros((BLOCK_M,), tl.float32) - 1.0  # the -1 pairs with the first max's e^0
        b = tl.zeros((BLOCK_M,), tl.float32)
        label_z = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_LABELS:
            labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        v_start = split * tiles_per_split * BLOCK_N
        k_steps = tl.cdiv(H, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        # One flat loop over (vocabulary tile, K step), as in Triton's persistent matmul, so the
        # loads stay pipelined across tiles; the softmax update runs after a tile's last K step.
        # A fixed trip count (the last split may run past V, masked): the interpreter needs it.
        for i in range(tiles_per_split * k_steps):
            tile = i // k_steps
            ks = (i % k_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
            cols = v_start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            k_ok = ks < H
            a = tl.load(
                hidden_ptr + rows[:, None] * stride_hr + ks[None, :] * stride_hh,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            w = tl.load(
                weight_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wh,
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )  # (BLOCK_K, BLOCK_N)
            if IEEE_FP32:  # fp32 inputs, or the interpreter (its bf16 dot is wrong)
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            if i % k_steps == k_steps - 1:
                z = tl.where(col_ok[None, :], acc * inv_temperature, -1.0e30)  # (BLOCK_M, BLOCK_N)
                tile_max = tl.max(z, axis=1)
                grows = tile_max > m
                m_new = tl.maximum(m, tile_max)
                alpha = tl.exp(m - m_new)
                d = z - m_new[:, None]
                e = tl.exp(d)  # 0 in masked columns, where d * e = -1e30 * 0 = 0 too
                b = alpha * (b + (m - m_new) * (r + 1.0)) + tl.sum(d * e, axis=1)
                # r stays Σ e^{z-m} - 1 without ever forming 1 + tiny: the entries equal to the
                # max (d = 0) count as exact 1s, less the one that is the new max.
                at_max = d == 0.0
                ones = tl.sum(at_max.to(tl.float32), axis=1) - grows.to(tl.float32)  # exact
                r = (
                    tl.where(grows, alpha * (r + 1.0), r)
                    + ones
                    + tl.sum(tl.where(at_max, 0.0, e), axis=1)
                )
                m = m_new
                if HAS_LABELS:
                    hit = cols[None, :] == labels[:, None]
                    label_z += tl.sum(tl.where(hit, z, 0.0), axis=1)
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        out = split * R + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(r_ptr + out, r, mask=row_ok)
        tl.store(b_ptr + out, b, mask=row_ok)
        if HAS_LABELS:
            tl.store(label_z_ptr + out, label_z, mask=row_ok)

    @triton.jit
    def _log1p(r):
        """log(1 + r) to fp32's relative accuracy for small r (Triton has no log1p)."""
        series = r * (1.0 - r * (0.5 - r * (1.0 / 3.0 - r * (0.25 - r * 0.2))))
        return tl.where(r < 1.0e-2, series, tl.log(1.0 + r))

    @triton.jit
    def _exponential(x):
        """Exp(1) draws from random uint32 x: -log(1 - v), v = (x + 1/2) / 2^32, with the
        small draws (the ones that decide a Gumbel-max) to fp32's relative accuracy."""
        v = (x.to(tl.uint32).to(tl.float32) + 0.5) * 2.3283064365386963e-10
        series = v * (1.0 + v * (0.5 + v * (1.0 / 3.0 + v * (0.25 + v * 0.2))))
        return tl.where(v < 1.0e-2, series, -tl.log(1.0 - v))

    @triton.jit(do_not_specialize=["seed"])
    def _logits_rows_kernel(
        logits_ptr, entropy_ptr, token_ptr, logprob_ptr, V, stride_row, inv_temperature, seed,
        BLOCK: tl.constexpr, SAMPLE: tl.constexpr, ENTROPY: tl.constexpr,
    ):  # fmt: skip
        """One row of existing logits per program, read once. Each of the BLOCK lanes keeps its
        own m, r = Σ e^{z-m} - 1 and b = Σ (z-m) e^{z-m} (one exp per element: e^{-|z-m|} is
        the new term or the rescale), and the lanes are merged like the head's splits.

        ENTROPY: keep b and store H (without it only the log-normaliser, for SAMPLE).
        SAMPLE: also draw a token by Gumbel-max, argmax z - log E with E ~ Exp(1) from Philox
        (seed, row * V + column), an exact draw from softmax(z), and its log-prob z - log Σe^z.
        """
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        m = tl.full((BLOCK,), -1.0e30, tl.float32)
        r = tl.zeros((BLOCK,), tl.float32) - 1.0
        b = tl.zeros((BLOCK,), tl.float32)
        if SAMPLE:
            best_key = tl.full((BLOCK,), float("-inf"), tl.float32)
            best_z = tl.zeros((BLOCK,), tl.float32)
            best_col = tl.zeros((BLOCK,), tl.int32)
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            ok = cols < V
            z = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32) * inv_temperature
            live = ok & (z > float("-inf"))  # masked-out tokens (-inf) carry no mass
            grows = z > m
            gap = tl.where(live, tl.abs(z - m), 0.0)  # not inf: inf * e^-inf would be NaN
            t = tl.exp(-gap)
            # grows: the old max and its rest rescale by t, the new max is the lane's 1.
            # else: z adds t to r and (z - m) t = -gap t to b (a tie adds exactly 1 and 0).
            if ENTROPY:
                b_new = tl.where(grows, t * (b - gap * (r + 1.0)), b - gap * t)
                b = tl.where(live, b_new, b)
            r = tl.where(live, tl.where(grows, t * (r + 1.0), r + t), r)
            m = tl.where(live & grows, z, m)
            if SAMPLE:
                key = z - tl.log(_exponential(tl.randint(seed, row * V + cols)))
                wins = ok & (key > best_key)
                best_key = tl.where(wins, key, best_key)
                best_z = tl.where(wins, z, best_z)
                best_col = tl.where(wins, cols, best_col)
        top = tl.max(m, axis=0)
        top_lane = tl.argmax(m, axis=0)
        w = tl.exp(m - top)  # 0 for lanes that saw no column
        lanes = tl.arange(0, BLOCK)
        r_all = tl.sum(w * r, axis=0) + tl.sum(tl.where(lanes == top_lane, 0.0, w), axis=0)
        log_s = _log1p(r_all)  # log Σ e^{z - top}
        if ENTROPY:
            b_all = tl.sum(w * (b + (m - top) * (r + 1.0)), axis=0)
            tl.store(entropy_ptr + row, log_s - b_all / (1.0 + r_all))
        if SAMPLE:
            winner = tl.argmax(best_key, axis=0)
            tl.store(token_ptr + row, tl.sum(tl.where(lanes == winner, best_col, 0), axis=0))
            z_token = tl.sum(tl.where(lanes == winner, best_z, 0.0), axis=0)
            tl.store(logprob_ptr + row, z_token - top - log_s)


INT32_LIMIT = 2**31
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), measured on an H100 (docs/benchmarks.md).
CUDA_CONFIG = (128, 256, 64, 8, 3)
INTERPRETER_CONFIG = (16, 32, 16, 1, 1)


def split_vocabulary(tiles: int, target: int) -> tuple[int, int]:
    """(tiles per split, splits) near `target` tiles per split that waste the fewest masked tiles."""
    target = max(1, min(target, tiles))
    best = min(
        range(max(1, target // 2), target + 1),
        key=lambda n: (math.ceil(tiles / n) * n - tiles, -n),
    )
    return best, math.ceil(tiles / best)


def merge_partials(
    m: torch.Tensor, r: torch.Tensor, b: torch.Tensor, label_z: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S, R) partial values of each vocabulary split -> entropy (R,), log p(label) (R,).

    r is each split's Σ e^{z-m} - 1; the merged r leaves out the 1 of one split holding the max.
    """
    top, top_split = m.max(0)  # (R,)
    weight = torch.exp(m - top)  # (S, R)
    not_top = torch.ones_like(weight).scatter_(0, top_split[None], 0.0)
    r_all = (weight * r).sum(0) + (weight * not_top).sum(0)
    b_all = (weight * (b + (m - top) * (r + 1.0))).sum(0)
    log_s = torch.log1p(r_all)
    entropy = log_s - b_all / (1.0 + r_all)
    logprob = None if label_z is None else label_z.sum(0) - (top + log_s)
    return entropy, logprob


def _check_head_inputs(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> None:
    if not fused_supported(hidden.device):
        raise RuntimeError(
            "the fused entropy kernel needs CUDA and triton (or TRITON_INTERPRET=1 on CPU)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for entropy scoring, got {temperature}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden (R, H) and weight (V, H), got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but the weight is {weight.dtype}")
    if weight.shape[0] * weight.stride(0) >= INT32_LIMIT:
        raise ValueError(
            f"unembedding {tuple(weight.shape)} too large for the kernel's int32 offsets"
        )


def _in_row_chunks(hidden, weight, labels, max_rows: int, **options):
    """`fused_entropy_and_logprob` over blocks of `max_rows` rows, concatenated."""
    parts = [
        fused_entropy_and_logprob(
            hidden[start : start + max_rows],
            weight,
            None if labels is None else labels.reshape(-1)[start : start + max_rows],
            **options,
        )
        for start in range(0, len(hidden), max_rows)
    ]
    entropy = torch.cat([h for h, _ in parts])
    return entropy, None if labels is None else torch.cat([lp for _, lp in parts])


def _launch_partials(hidden, weight, labels, partial, temperature: float, tiles_per_split, config):
    """`_partials_kernel` over (row blocks, vocabulary splits), writing partial (4, S, R)."""
    block_m, block_n, block_k, warps, stages = config
    rows, width = hidden.shape
    grid = (math.ceil(rows / block_m), partial.shape[1])
    _partials_kernel[grid](
        hidden,
        weight,
        labels if labels is not None else partial,
        partial[0],
        partial[1],
        partial[2],
        partial[3],
        rows,
        weight.shape[0],
        width,
        1.0 / temperature,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        tiles_per_split,
        HAS_LABELS=labels is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        IEEE_FP32=hidden.dtype == torch.float32 or hidden.device.type == "cpu",
        num_warps=warps,
        num_stages=stages,
    )


def fused_entropy_and_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    cols_per_split: int = 4096,
    config: tuple[int, int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy and label log-prob of softmax(hidden @ weightᵀ / T) for each row, in fp32.

    hidden (R, H) and weight (V, H) in the same dtype and on one device; labels (R,) or None.
    Returns (R,) float32 tensors (log-prob None without labels).
    """
    _check_head_inputs(hidden, weight, temperature)
    rows = hidden.shape[0]
    max_rows = INT32_LIMIT // max(1, hidden.stride(0)) // 1024 * 1024
    if rows > max_rows:  # offsets are int32 in the kernel: score such batches in row chunks
        options = dict(temperature=temperature, cols_per_split=cols_per_split, config=config)
        return _in_row_chunks(hidden, weight, labels, max_rows, **options)
    config = config or (INTERPRETER_CONFIG if hidden.device.type == "cpu" else CUDA_CONFIG)
    tiles_per_split, splits = split_vocabulary(
        math.ceil(weight.shape[0] / config[1]), cols_per_split // config[1]
    )
    partial = torch.empty((4, splits, rows), dtype=torch.float32, device=hidden.device)
    if labels is not None:
        labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64).contiguous()
        if labels.shape[0] != rows:
            raise ValueError(f"{labels.shape[0]} labels for {rows} rows")
    if rows:
        _launch_partials(hidden, weight, labels, partial, temperature, tiles_per_split, config)
    return merge_partials(
        partial[0], partial[1], partial[2], partial[3] if labels is not None else None
    )


def _check_logits(logits: torch.Tensor, temperature: float, what: str) -> None:
    if not fused_supported(logits.device):
        raise RuntimeError(f"{what} needs CUDA and triton (or TRITON_INTERPRET=1 on CPU)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"need contiguous rows of logits (B, V), got shape {tuple(logits.shape)}")


def _row_kernel_launch(logits, outputs, temperature: float, seed: int, sample, entropy) -> None:
    cpu = logits.device.type == "cpu"
    if logits.shape[0]:
        _logits_rows_kernel[(logits.shape[0],)](
            logits, *outputs, logits.shape[1], logits.stride(0), 1.0 / temperature, seed,
            BLOCK=256 if cpu else 2048, SAMPLE=sample, ENTROPY=entropy, num_warps=1 if cpu else 8,
        )  # fmt: skip


def logits_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (B,) fp32 of softmax(logits / T) for logits (B, V) that exist already (a decode
    step's), in one read of each row; the same r/b form as the fused head."""
    _check_logits(logits, temperature, "logits_entropy")
    entropy = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _row_kernel_launch(logits, (entropy, entropy, entropy), temperature, 0, False, True)
    return entropy


def sample_with_entropy(
    logits: torch.Tensor, temperature: float, seed: int, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One exact draw from softmax(logits / T) per row, in one read of logits (B, V).

    Returns tokens (B,) long, their log-probs and the rows' entropies (B,) fp32 (None without
    `with_entropy`), all under softmax(logits / T). `seed` (any int below 2^63) picks the Philox stream: a different seed
    for every call, or the same tokens come again.
    """
    _check_logits(logits, temperature, "sample_with_entropy")
    rows, device = logits.shape[0], logits.device
    entropy = torch.empty(rows, dtype=torch.float32, device=device)
    logprob = torch.empty(rows, dtype=torch.float32, device=device)
    token = torch.empty(rows, dtype=torch.int32, device=device)
    _row_kernel_launch(logits, (entropy, token, logprob), temperature, seed, True, with_entropy)
    return token.long(), logprob, entropy if with_entropy else None

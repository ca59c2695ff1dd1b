"""The factored Fisher-kernel sketch at 10⁴ x 10⁴ sequences on the demo model, against the exact
kernel on a subset and against a plain batched forward+backward in the same process.

    python bench/fisher_sketch.py [--run-dir results/runs/demo] [--step 10] [--n-e 10000]
                                  [--n-u 10000] [--k 16] [--rank 1] [--subset 512]

Sequences: E = the first n_e responses of the checkpoint's ΔH E-batch (sampled by the demo
policy); U = the other responses of every ΔH file under the run (E- and U-batches), then, if
those are fewer than n_u, pairs of a random real prompt with a random real response (all demo
prompts have the same template and length). √P = D^(-1/2): D from the ΔH file when it has one,
else from the checkpoint's Adam state (√v̂ + ε at the saved step, without the replayed step).

Streams each sequence's factored sketch (k_in = k_out = k, rank-ρ √P) to an HDF5 store, then
K̂ = Ŝ_E Ŝ_Uᵀ in row blocks to an HDF5 file; times it all; measures the cost per sequence
against a plain batched forward+backward of Σ S (LoRA weight gradients) on the same `--cost-n`
E sequences, interleaved; and the error in cosine units, RMS over entries of |K̂ - K|/(‖g‖‖g'‖),
against the exact kernel (`sequence_gradients`, float64) on the first `subset` x `subset`
entries, split into the √P factorisation's share (no projection) and the projection's share
(exact P), and over `--k-sweep`. Writes bench/results/fisher_sketch.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import torch
from bench_results import machine, write_result

from entroflow.checkpoint.delta_h_result import DeltaHResult
from entroflow.checkpoint.fisher_run import batch_sequences
from entroflow.estimators.fisher import flatten_blocks, jl_sketch, sequence_gradients
from entroflow.estimators.fisher_sketch import (
    FactoredSketch,
    cosine_error_rms,
    preconditioner_error,
)
from entroflow.io import ContractError, read_token_file
from entroflow.lm.batching import pair_batches
from entroflow.lm.checkpoints import load_adam_state, load_policy
from entroflow.lm.models import load_tokenizer
from entroflow.lm.scoring import batch_scores

BUDGET = 4096  # tokens per batch, as the Fisher stage


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sequences(run_dir: str, step: int, n_e: int, n_u: int, seed: int = 0):
    """(E prompts, E responses, U prompts, U responses, U real count)."""
    own = read_token_file(f"{run_dir}/delta_h/checkpoint-{step}.h5", root="e_batch")
    p, r = batch_sequences(own)
    if len(p) < n_e:
        raise SystemExit(f"the E-batch has {len(p)} responses, fewer than --n-e {n_e}")
    e_p, e_r, u_p, u_r = p[:n_e], r[:n_e], p[n_e:], r[n_e:]
    for path in sorted(Path(run_dir, "delta_h").glob("checkpoint-*.h5")):
        for root in ("e_batch", "u_batch"):
            if path.stem == f"checkpoint-{step}" and root == "e_batch":
                continue
            pp, rr = batch_sequences(read_token_file(path, root=root))
            u_p, u_r = u_p + pp, u_r + rr
    real = min(len(u_p), n_u)
    u_p, u_r = u_p[:real], u_r[:real]
    rng = np.random.default_rng(seed)
    pool_p, pool_r = e_p + u_p, e_r + u_r
    while len(u_p) < n_u:  # cross pairs: a real prompt with another row's real response
        u_p.append(pool_p[rng.integers(len(pool_p))])
        u_r.append(pool_r[rng.integers(len(pool_r))])
    return e_p, e_r, u_p, u_r, real


def sqrt_preconditioner(run_dir: str, step: int, names) -> tuple[dict, str]:
    path = f"{run_dir}/delta_h/checkpoint-{step}.h5"
    try:
        d = DeltaHResult.read(path).denominator
        if d:
            return {n: torch.as_tensor(d[n]).double().rsqrt() for n in names}, "delta_h file"
    except ContractError:
        pass
    state = load_adam_state(f"{run_dir}/checkpoint-{step}")
    out = {}
    for n in names:
        s = state[n]
        bc2 = 1 - s["betas"][1] ** float(s["step"])
        d = (s["exp_avg_sq"].double() / bc2).sqrt() + s["eps"]
        out[n] = d.rsqrt()
    return out, "checkpoint Adam state (sqrt(v_hat) + eps at the saved step)"


def stream(sketch, model, prompts, responses, ds, pad) -> None:
    for idx, rows in sketch.sequences(
        model, prompts, responses, pad_token_id=pad, temperature=1.0, max_tokens_per_batch=BUDGET
    ):
        order = np.argsort(idx)
        ds[np.asarray(idx)[order].tolist()] = rows[order].numpy()


def exact_rows(model, prompts, responses, names, sqrt_p, pad) -> torch.Tensor:
    out = None
    for idx, grads in sequence_gradients(
        model, prompts, responses, names, pad_token_id=pad, temperature=1.0
    ):
        rows = flatten_blocks(grads, names, sqrt_p)
        if out is None:
            out = torch.zeros(len(prompts), rows.shape[1], dtype=torch.float64)
        out[idx] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="results/runs/demo")
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--model", default="resources/models/demo")
    parser.add_argument("--n-e", type=int, default=10_000)
    parser.add_argument("--n-u", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=16, help="k_in = k_out per layer")
    parser.add_argument("--rank", type=int, default=1, help="rank of √P's factorisation")
    parser.add_argument("--preconditioner", choices=["exact", "factored"], default="exact")
    parser.add_argument("--jl-reference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--subset", type=int, default=512)
    parser.add_argument("--cost-n", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--k-sweep", type=int, nargs="*", default=[4, 8, 16, 32])
    parser.add_argument("--work-dir", default=None, help="where the stores go (default: a tmp)")
    parser.add_argument("--out", default="bench/results/fisher_sketch.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    pad = tokenizer.pad_token_id
    model = load_policy(args.model, f"{args.run_dir}/checkpoint-{args.step}", merge=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    e_p, e_r, u_p, u_r, u_real = sequences(args.run_dir, args.step, args.n_e, args.n_u)
    sqrt_p, p_source = sqrt_preconditioner(args.run_dir, args.step, names)
    sketch = FactoredSketch(
        model,
        names,
        k_in=args.k,
        k_out=args.k,
        sqrt_p=sqrt_p,
        rank=args.rank,
        seed=0,
        preconditioner=args.preconditioner,
    )
    n_params = sum(params[n].numel() for n in names)
    print(
        f"E {len(e_p)}, U {len(u_p)} ({u_real} real, {len(u_p) - u_real} cross-paired); "
        f"{len(names)} LoRA tensors, {n_params} parameters; sketch dim {sketch.dim}; √P from "
        f"{p_source}",
        flush=True,
    )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fisher_sketch_"))
    work.mkdir(parents=True, exist_ok=True)
    rss_before = peak_rss_mib()

    # ---- the 10⁴ x 10⁴ run -------------------------------------------------------------------
    t0 = time.perf_counter()
    with h5py.File(work / "sketches.h5", "w") as store:
        for key, (p, r) in (("e", (e_p, e_r)), ("u", (u_p, u_r))):
            ds = store.create_dataset(
                key, shape=(len(p), sketch.dim), dtype=np.float32, chunks=(64, sketch.dim)
            )
            stream(sketch, model, p, r, ds, pad)
            print(f"  sketched {key}: {time.perf_counter() - t0:.1f} s", flush=True)
    t_sketch = time.perf_counter() - t0
    with h5py.File(work / "sketches.h5", "r") as store, h5py.File(work / "kernel.h5", "w") as kf:
        s_u = torch.from_numpy(store["u"][:])
        k_ds = kf.create_dataset("K_sketch", shape=(len(e_p), len(u_p)), dtype=np.float32)
        for start in range(0, len(e_p), 2048):
            k_ds[start : start + 2048] = (
                torch.from_numpy(store["e"][start : start + 2048]) @ s_u.T
            ).numpy()
        del s_u
    t_total = time.perf_counter() - t0
    t_kernel = t_total - t_sketch
    print(f"  kernel: {t_kernel:.1f} s; total {t_total:.1f} s", flush=True)
    peak_run = peak_rss_mib()
    disk = {f.name: f.stat().st_size for f in work.glob("*.h5")}

    # ---- cost per sequence against a plain batched forward+backward ---------------------------
    c_p, c_r = e_p[: args.cost_n], e_r[: args.cost_n]

    def plain():
        for batch in pair_batches(c_p, c_r, BUDGET):
            _, logprob = batch_scores(
                model, [c_p[i] for i in batch], [c_r[i] for i in batch], pad_token_id=pad
            )
            torch.autograd.grad(logprob.sum(), [params[n] for n in names])

    def sketched():
        for _ in sketch.sequences(
            model, c_p, c_r, pad_token_id=pad, temperature=1.0, max_tokens_per_batch=BUDGET
        ):
            pass

    other = FactoredSketch(
        model,
        names,
        k_in=args.k,
        k_out=args.k,
        sqrt_p=sqrt_p,
        rank=1,
        preconditioner="exact" if args.preconditioner == "factored" else "factored",
    )

    def other_sketch():
        for _ in other.sequences(
            model, c_p, c_r, pad_token_id=pad, temperature=1.0, max_tokens_per_batch=BUDGET
        ):
            pass

    times = {"plain": [], "sketch": [], "other": []}
    for _ in range(args.repeat):
        for key, fn in (("plain", plain), ("sketch", sketched), ("other", other_sketch)):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    t_plain, t_sk = float(np.median(times["plain"])), float(np.median(times["sketch"]))
    print(f"  cost: plain {t_plain:.2f} s, sketch {t_sk:.2f} s = {t_sk / t_plain:.2f}x", flush=True)

    # ---- error against the exact kernel on the subset ----------------------------------------
    s = args.subset
    g_e = exact_rows(model, e_p[:s], e_r[:s], names, sqrt_p, pad)
    g_u = exact_rows(model, u_p[:s], u_r[:s], names, sqrt_p, pad)
    exact = (g_e @ g_u.T).numpy()
    n_e, n_u = g_e.norm(dim=1).numpy(), g_u.norm(dim=1).numpy()
    jl = float("nan")
    if args.jl_reference:  # a dense Gaussian JL of the whole rows at the same dimension
        a = torch.zeros(s, sketch.dim, dtype=torch.float64)
        b = torch.zeros(s, sketch.dim, dtype=torch.float64)
        for start in range(0, g_e.shape[1], 4096):
            a += jl_sketch(g_e[:, start : start + 4096], sketch.dim, 0, start)
            b += jl_sketch(g_u[:, start : start + 4096], sketch.dim, 0, start)
        jl = cosine_error_rms((a @ b.T).numpy(), exact, n_e, n_u)
        del a, b
    del g_e, g_u
    with h5py.File(work / "kernel.h5", "r") as kf:
        approx = kf["K_sketch"][:s, :s]
    error = cosine_error_rms(approx, exact, n_e, n_u)
    rel_fro = float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
    cosine = exact / np.outer(n_e, n_u)
    print(f"  cosine error (RMS) {error:.4f}; relative Frobenius {rel_fro:.4f}", flush=True)

    def subset_error(**kw) -> float:
        sk = FactoredSketch(model, names, sqrt_p=sqrt_p, **kw)
        run = dict(pad_token_id=pad, temperature=1.0, max_tokens_per_batch=BUDGET)
        a = sk.sketch_all(model, e_p[:s], e_r[:s], **run)
        b = sk.sketch_all(model, u_p[:s], u_r[:s], **run)
        return cosine_error_rms((a.double() @ b.double().T).numpy(), exact, n_e, n_u)

    p_only = {
        rank: subset_error(k_in=0, k_out=0, rank=rank, dtype=torch.float64) for rank in (1, 2, 4)
    }
    print(f"  √P factorisation only (no projection), by rank: {p_only}", flush=True)
    proj_only = subset_error(k_in=args.k, k_out=args.k, preconditioner="exact", seed=0)
    shared = subset_error(
        k_in=args.k, k_out=args.k, preconditioner="exact", seed=0, random_signs=False
    )
    sweep = []
    for k in args.k_sweep:
        row = {"k": k, "dim": FactoredSketch(model, names, k_in=k, k_out=k, sqrt_p=sqrt_p).dim}
        row["cosine_error_rms_factored_rank1"] = subset_error(k_in=k, k_out=k, rank=1, seed=1)
        row["cosine_error_rms_exact_p"] = subset_error(
            k_in=k, k_out=k, preconditioner="exact", seed=1
        )
        sweep.append(row)
        print(f"  sweep {row}", flush=True)
    p_rel = [preconditioner_error(sqrt_p[n], args.rank) for n in names]

    result = {
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "sequences_e": len(e_p),
        "sequences_u": len(u_p),
        "sequences_u_real": u_real,
        "sequences_u_cross_paired": len(u_p) - u_real,
        "tokens": int(sum(len(a) + len(b) for a, b in zip(e_p + u_p, e_r + u_r, strict=True))),
        "lora_tensors": len(names),
        "parameters": int(n_params),
        "sketch": {
            "k_in": args.k,
            "k_out": args.k,
            "preconditioner": args.preconditioner,
            "rank": args.rank if args.preconditioner == "factored" else None,
            "dim": sketch.dim,
        },
        "preconditioner_source": p_source,
        "cosine_error_rms": error,
        "cosine_error_rms_preconditioner_only_by_rank": p_only,
        "cosine_error_rms_projection_only": proj_only,
        "cosine_error_rms_projection_only_without_signs": shared,
        "cosine_error_rms_dense_jl_same_dim": jl,
        "relative_frobenius_error": rel_fro,
        "exact_cosine_rms": float(np.sqrt(np.mean(cosine**2))),
        "error_subset": [s, s],
        "preconditioner_factor_relative_error_mean": float(np.mean(p_rel)),
        "preconditioner_factor_relative_error_max": float(np.max(p_rel)),
        "cost_per_sequence_vs_backward": t_sk / t_plain,
        "cost_sequences": len(c_p),
        "cost_seconds_plain_forward_backward": t_plain,
        "cost_seconds_sketch": t_sk,
        "cost_per_sequence_vs_backward_other_preconditioner": float(np.median(times["other"]))
        / t_plain,
        "other_preconditioner": other.preconditioner,
        "seconds": t_total,
        "seconds_sketch": t_sketch,
        "seconds_kernel": t_kernel,
        "sequences_per_second": (len(e_p) + len(u_p)) / t_sketch,
        "peak_rss_mib": peak_run,
        "peak_rss_mib_before_run": rss_before,
        "bytes_per_sequence": sketch.dim * 4,
        "disk_bytes": disk,
        "exact_store_bytes_would_be": int((len(e_p) + len(u_p)) * n_params * 4),
        "k_sweep": sweep,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "k_sweep"}, indent=1))
    out = write_result(args.out, result)
    print(f"wrote {out}; stores under {work}")


if __name__ == "__main__":
    main()

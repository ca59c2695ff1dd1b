"""Cost of the ΔH sweep and of per-sequence gradients, against plain passes in the same process.

    python bench/delta_h_fisher_cost.py [--run-dir results/runs/demo] [--step 10]

Uses a checkpoint and its ΔH file (`make demo` makes both). Prints:
  - the η sweep (2K shifted forwards) in units of one plain no-grad forward over the E-batch,
  - per-sequence gradient throughput (hooks, one batched backward) / plain batched forward+backward.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from entroflow.checkpoint.delta_h_result import DeltaHResult
from entroflow.checkpoint.fisher_run import batch_sequences
from entroflow.estimators.delta_h import score_sequences, shifted
from entroflow.estimators.fisher import sequence_gradients
from entroflow.lm.checkpoints import load_policy
from entroflow.lm.models import load_tokenizer


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="results/runs/demo")
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--model", default="resources/models/demo")
    args = parser.parse_args()
    ckpt = f"{args.run_dir}/checkpoint-{args.step}"
    dh_path = f"{args.run_dir}/delta_h/checkpoint-{args.step}.h5"
    delta_h = DeltaHResult.read(dh_path)
    etas = delta_h.settings["delta_h"]["eta_scale"]
    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, ckpt, merge=False)
    e_batch = delta_h.e_batch
    # The sweep's sequences: the first 256 first draws (the Fisher kernel's evaluation rows).
    first = np.flatnonzero(e_batch["responses/sample_index"] == 0)[:256]
    prompts, responses = batch_sequences(e_batch, first)
    kw = dict(pad_token_id=tokenizer.pad_token_id, temperature=1.0, accum_dtype=torch.float64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    direction = {n: torch.randn_like(params[n]) * 1e-3 for n in names}

    def forward():
        with torch.no_grad():
            score_sequences(model, prompts, responses, **kw)

    def sweep():
        with torch.no_grad():
            for eta in etas:
                for sign in (1, -1):
                    with shifted(model, direction, sign * eta):
                        score_sequences(model, prompts, responses, **kw)

    def forward_backward():
        scores = score_sequences(model, prompts, responses, max_tokens_per_batch=4096, **kw)
        torch.autograd.grad(sum(lp.sum() for lp in scores.logprob), [params[n] for n in names])

    def per_sequence():
        for _ in sequence_gradients(
            model,
            prompts,
            responses,
            names,
            pad_token_id=tokenizer.pad_token_id,
            temperature=1.0,
            max_tokens_per_batch=4096,
        ):
            pass

    t_fwd, t_sweep = timed(forward), timed(sweep)
    t_fb, t_ps = timed(forward_backward), timed(per_sequence)
    print(
        f"device cpu, threads {torch.get_num_threads()}, E-batch {len(prompts)} sequences, {len(names)} LoRA tensors"
    )
    print(
        f"forward over the E-batch: {t_fwd:.3f} s; η sweep ({2 * len(etas)} shifted forwards): {t_sweep:.3f} s = {t_sweep / t_fwd:.1f} forwards"
    )
    print(
        f"plain batched forward+backward: {t_fb:.3f} s; per-sequence gradients: {t_ps:.3f} s; throughput ratio {t_fb / t_ps:.2f}"
    )
    store_and_gemm(len(prompts), sum(params[n].numel() for n in names))


def store_and_gemm(n_rows: int, n_params: int, n_u: int = 64, block: int = 8192) -> None:
    """Gradient store write speed (float32, chunked like the Fisher stage) and kernel GEMM rate."""
    import tempfile

    import h5py
    import numpy as np

    from entroflow.checkpoint.fisher_run import kernel_from_store

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n_rows, n_params), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp, h5py.File(f"{tmp}/g.h5", "w") as store:
        start = time.perf_counter()
        for key, n in (("e", n_rows), ("u", n_u)):
            ds = store.create_dataset(
                key,
                shape=(n, n_params),
                dtype=np.float32,
                chunks=(min(n, 64), min(n_params, block)),
            )
            for s in range(0, n, 32):
                ds[s : s + 32] = rows[s : min(s + 32, n)]
        store.flush()
        t_write = time.perf_counter() - start
        mb = (n_rows + n_u) * n_params * 4 / 2**20
        t_gemm = timed(lambda: kernel_from_store(store, block))
    gflop = 2 * n_rows * n_u * n_params / 1e9
    print(
        f"gradient store: {mb:.0f} MiB written in {t_write:.2f} s = {mb / t_write:.0f} MiB/s; "
        f"kernel from store ({n_rows} x {n_u} x {n_params}): {t_gemm:.2f} s = {gflop / t_gemm:.2f} GFLOP/s (reads included)"
    )


if __name__ == "__main__":
    main()

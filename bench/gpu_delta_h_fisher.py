"""The ΔH and Fisher stages' per-checkpoint work on a random-weight Qwen2.5 shape, in one process.

    PYTHONPATH=. python bench/gpu_delta_h_fisher.py [--shape 1.5B] [--sequences 512] [--tokens 1024]
        [--rank 64] [--eta-points 6] [--store-sequences 16] [--json PATH]
    PYTHONPATH=. python bench/gpu_delta_h_fisher.py --shape tiny --sequences 16 --tokens 64  # CPU

The model: `gpu_common.random_qwen` (bf16 on CUDA, fp32 on CPU) with a PEFT LoRA of rank --rank
on every projection (q, k, v, o, gate, up, down; B drawn non-zero, so both factors have
gradients). The E-batch: --sequences synthetic sequences of --tokens tokens each (a
--prompt-tokens prompt, by default 1/16 of them, and the rest response, random ids). The Adam state: random first and
second moments at step 10 (lr 1e-5), and the update direction from the stage's own
`replay_step` on a --u-sequences U-batch with ±1 advantages, so v, its gradient part and D are
what the stage would compute. Every pass calls the library function the stage calls:

  forward      `score_sequences` (no grad, the stage's token budget and accum dtype)
  η sweep      --eta-points values of η, each at θ + ηv and θ - ηv (`shifted` + `score_sequences`
               + `functional_values`, as `delta_h_run.eta_sweep`): cost in plain forwards over
               the E-batch against the minimum, 2 x --eta-points forwards
  δH₁ tangents `e_batch.tangents_along` (forward-mode JVPs along v and its gradient part)
  per-sequence `fisher.sequence_gradients` over the E-batch, against a plain batched
               forward+backward (LoRA weight gradients of Σ S) of the same batches
  sketch       `fisher_run.factored_sketch` (the stage's: exact √P, sketch_side per wide side)
               over the E-batch
  store        `fisher_run.stream_gradients` on the first --store-sequences sequences (float32
               √P ⊙ ∇S rows to HDF5, as the stage writes them) and a plain write of the same
               bytes, then the sketch rows of the sketched sequences; each timed to after fsync
--jvp-sequences and --fisher-sequences take the first n sequences for those parts (shorter runs:
the JVPs' forward-equivalents are then against the forward's share of those n sequences, all
sequences having one length; per-sequence gradients and the sketch against the plain
forward+backward of the same n). Times are one run after a warm-up on --warmup-sequences (one
full batch), the device synchronised (--repeat for more); peak memory per part is
torch.cuda.max_memory_allocated, weights included. Prints progress and rewrites the JSON after
each part, so a run cut short keeps what it
measured ("complete": false). Writes --json, by default bench/results/gpu_delta_h_fisher.json on
CUDA and bench/results/delta_h_fisher_<shape>_cpu.json on CPU. The stores go to a temporary
folder (--work-dir), deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import torch
from bench_results import machine, write_result
from gpu_common import random_qwen

from entroflow.checkpoint.e_batch import tangents_along
from entroflow.checkpoint.fisher_run import factored_sketch, stream_gradients
from entroflow.checkpoint.replay import replay_step
from entroflow.checkpoint.settings import DeltaHSettings, FisherSettings, RunShape
from entroflow.estimators.adam import replay_adamw
from entroflow.estimators.delta_h import functional_values, score_sequences, shifted
from entroflow.estimators.fisher import sequence_gradients
from entroflow.lm.batching import pair_batches
from entroflow.lm.scoring import batch_scores

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ACCUM = {"float32": torch.float32, "float64": torch.float64}


class Bench:
    """The device, the clock (synchronised), peak memory per part, and the JSON written as it goes."""

    def __init__(self, device: str, out: Path, result: dict):
        self.device, self.out, self.result = device, out, result
        self.t0 = time.perf_counter()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def seconds(self, fn, repeat: int = 1) -> float:
        """Median wall seconds of fn() (no warm-up here: callers warm up on a few sequences)."""
        times = []
        for _ in range(repeat):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def start_peak(self) -> None:
        if self.device == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if self.device != "cuda":
            return None
        self.sync()
        return torch.cuda.max_memory_allocated() / 2**30

    @contextlib.contextmanager
    def part(self, name: str):
        """One measured part: its peak memory recorded as peak_gib_<name>; an exception (out of
        memory included) is recorded under "errors" and the next part still runs."""
        self.start_peak()
        try:
            yield
            self.result[f"peak_gib_{name}"] = self.peak_gib()
        except Exception as error:
            traceback.print_exc()
            self.result.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"[:2000]
            self.log(f"{name} failed: {type(error).__name__}")
            if self.device == "cuda":
                torch.cuda.empty_cache()
        self.save()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def save(self, **figures) -> None:
        self.result.update(figures)
        self.result["machine"] = machine()
        self.result["seconds_total"] = time.perf_counter() - self.t0
        write_result(self.out, self.result)


def lora_model(shape: str, rank: int, device: str, seed: int = 0):
    """random_qwen(shape) with a PEFT LoRA of `rank` on every projection, B drawn non-zero."""
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = random_qwen(shape, dtype=dtype, seed=seed, device=device)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PROJECTIONS)
    model = get_peft_model(base, config)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: A's gradients would all vanish
                p.copy_(torch.randn(p.shape, generator=gen).to(p) / rank)
    return model.eval()


def synthetic_adam_state(names, params, seed: int = 0, lr: float = 1e-5) -> dict[str, dict]:
    """`load_adam_state`-style state: random moments at step 10, AdamW's defaults otherwise."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    state = {}
    for n in names:
        p = params[n]
        m = torch.randn(p.shape, generator=gen) * 1e-4
        v = (torch.randn(p.shape, generator=gen) * 1e-4) ** 2 + 1e-10
        state[n] = {
            "exp_avg": m.to(p.device, torch.float32),
            "exp_avg_sq": v.to(p.device, torch.float32),
            "step": 10,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "lr": lr,
        }
    return state


def random_sequences(n: int, tokens: int, prompt_tokens: int, vocab: int, seed: int):
    gen = np.random.default_rng(seed)
    ids = gen.integers(2, vocab, size=(n, tokens)).tolist()  # 0, 1: pad / EOS of the tiny shape
    return [row[:prompt_tokens] for row in ids], [row[prompt_tokens:] for row in ids]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def show(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fsynced_write(path: Path, write) -> float:
    """Seconds of write(h5py file) until the file is closed and fsync'd."""
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        write(f)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default=None, help="tiny (CPU default) | 0.5B | 1.5B (CUDA)")
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024, help="per sequence, prompt included")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default tokens/16")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--eta-points", type=int, default=len(DeltaHSettings().eta_scale))
    parser.add_argument("--u-sequences", type=int, default=4)
    parser.add_argument(
        "--jvp-sequences", type=int, default=0, help="the first n for the JVPs (0: all)"
    )
    parser.add_argument(
        "--fisher-sequences", type=int, default=0, help="the first n for the Fisher parts (0: all)"
    )
    parser.add_argument("--store-sequences", type=int, default=16)
    parser.add_argument("--accum-dtype", choices=list(ACCUM), default=DeltaHSettings().accum_dtype)
    parser.add_argument(
        "--warmup-sequences", type=int, default=8, help="8 x 1,024 tokens: one whole ΔH batch"
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="stores go here (default: a tmp)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = args.shape or ("1.5B" if device == "cuda" else "tiny")
    name = "gpu_delta_h_fisher" if device == "cuda" else f"delta_h_fisher_{shape}_cpu"
    out = Path(args.json or Path(__file__).resolve().parent / "results" / f"{name}.json")
    accum = ACCUM[args.accum_dtype]
    if args.prompt_tokens is None:
        args.prompt_tokens = args.tokens // 16
    fisher = FisherSettings()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "complete": False,
        "shape": shape,
        "dtype": "bfloat16" if device == "cuda" else "float32",
        "lora_rank": args.rank,
        "lora_targets": PROJECTIONS,
        "sequences": args.sequences,
        "tokens_per_sequence": args.tokens,
        "prompt_tokens": args.prompt_tokens,
        "accum_dtype": args.accum_dtype,
        "delta_h_tokens_per_batch": 8192,  # score_sequences' default, what the ΔH stage uses
        "fisher_tokens_per_batch": fisher.max_tokens_per_batch,
    }
    b = Bench(device, out, result)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = DeltaHSettings().tf32
        result["gpu"] = torch.cuda.get_device_name()

    model = lora_model(shape, args.rank, device)
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    n_params = int(sum(params[n].numel() for n in names))
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    vocab = model.config.vocab_size
    pad = model.config.pad_token_id
    prompts, responses = random_sequences(args.sequences, args.tokens, args.prompt_tokens, vocab, 0)
    u_prompts, u_responses = random_sequences(
        args.u_sequences, args.tokens, args.prompt_tokens, vocab, 1
    )
    w = args.warmup_sequences
    n_tokens = args.sequences * args.tokens
    b.save(lora_tensors=len(names), lora_parameters=n_params, model_gib=weights_gib)
    b.log(f"{shape} on {device}: {len(names)} LoRA tensors, {n_params:,} parameters")

    # ---- the update direction: the stage's replay of one AdamW step on a U-batch -------------
    run = RunShape("dr_grpo", 8, args.tokens - args.prompt_tokens, 1.0, 0.0)
    adam_state = synthetic_adam_state(names, params)
    advantages = np.where(np.arange(args.u_sequences) % 2 == 0, 1.0, -1.0)
    step = None
    with b.part("replay"):
        start = time.perf_counter()
        step = replay_step(model, u_prompts, u_responses, advantages, run, adam_state, pad, accum)
        b.sync()
        t_replay = time.perf_counter() - start
        b.save(seconds_replay_step_u_batch=t_replay, u_sequences=args.u_sequences)
        b.log(f"replayed AdamW step on {args.u_sequences} U sequences: {t_replay:.1f} s")
    if step is None:  # the rest still runs, along a step from random gradients
        gen = torch.Generator(device="cpu").manual_seed(3)
        grads = {n: torch.randn(params[n].shape, generator=gen).to(params[n]) for n in names}
        step = replay_adamw({n: params[n].detach() for n in names}, grads, adam_state)

    # ---- ΔH: plain forward, η sweep, tangents ------------------------------------------------
    def scorer(p, r):
        return lambda: score_sequences(
            model, p, r, pad_token_id=pad, temperature=1.0, accum_dtype=accum
        )

    score_all = scorer(prompts, responses)

    last = {}

    def forward():
        with torch.no_grad():
            last["scores"] = score_all()

    t_fwd = None
    with b.part("forward"):
        with torch.no_grad():
            scorer(prompts[:w], responses[:w])()  # warm-up
        b.start_peak()
        t_fwd = b.seconds(forward, args.repeat)
        b.save(seconds_forward=t_fwd, forward_tokens_per_second=n_tokens / t_fwd)
        b.log(f"plain forward over the E-batch: {t_fwd:.2f} s ({n_tokens / t_fwd:,.0f} tok/s)")

    etas = np.asarray(DeltaHSettings().eta_scale[: args.eta_points]) * step.lr
    with b.part("sweep"):
        s_old = functional_values(last.pop("scores"), "rb")[1]

        def sweep():
            with torch.no_grad():
                for eta in etas:
                    for sign in (1.0, -1.0):
                        with shifted(model, step.direction, sign * eta):
                            new = score_all()
                        a_new, s_new, _ = functional_values(new, "rb")
                        assert np.isfinite(s_new - s_old).all() and np.isfinite(a_new).all()

        b.start_peak()
        t_sweep = b.seconds(sweep, 1)
        minimum = 2 * len(etas)
        b.save(
            seconds_sweep=t_sweep,
            eta_points=len(etas),
            sweep_forwards_minimum=minimum,
            sweep_forward_equivalents=ratio(t_sweep, t_fwd),
            sweep_over_minimum=ratio(t_sweep, t_fwd and t_fwd * minimum),
        )
        b.log(
            f"η sweep ({minimum} shifted forwards): {t_sweep:.2f} s = "
            f"{show(ratio(t_sweep, t_fwd))} forwards"
        )

    n_jvp = min(args.jvp_sequences or args.sequences, args.sequences)
    with b.part("jvp"):
        clock: dict[str, list[float]] = {}
        tangents_along({}, scorer(prompts[:w], responses[:w]), model, step)  # warm-up
        b.start_peak()
        b.sync()
        total, _ = tangents_along(clock, scorer(prompts[:n_jvp], responses[:n_jvp]), model, step)
        b.sync()
        assert all(np.isfinite(d).all() for d in total.d_entropy)
        t_jvp = float(np.mean(clock["jvp"]))
        # against the forward over the same sequences (equal lengths: the forward's share)
        t_fwd_jvp = t_fwd and t_fwd * n_jvp / args.sequences
        b.save(
            jvp_sequences=n_jvp,
            seconds_jvp_each=clock["jvp"],
            jvp_forward_equivalents=ratio(t_jvp, t_fwd_jvp),
            tangent_pass_forward_equivalents=ratio(sum(clock["jvp"]), t_fwd_jvp),
        )
        b.log(
            f"δH₁ tangents (2 JVPs: v, gradient part): {sum(clock['jvp']):.2f} s = "
            f"{show(ratio(t_jvp, t_fwd_jvp))} forwards each ({n_jvp} sequences)"
        )
        del total

    # ---- Fisher: per-sequence gradients against a plain forward+backward ----------------------
    budget = fisher.max_tokens_per_batch
    lora = [params[n] for n in names]

    n_fisher = min(args.fisher_sequences or args.sequences, args.sequences)
    f_prompts, f_responses = prompts[:n_fisher], responses[:n_fisher]
    b.save(fisher_sequences=n_fisher)

    def plain(p=f_prompts, r=f_responses):
        for batch in pair_batches(p, r, budget):
            _, logprob = batch_scores(
                model,
                [p[i] for i in batch],
                [r[i] for i in batch],
                pad_token_id=pad,
                accum_dtype=torch.float64,
            )
            torch.autograd.grad(logprob.sum(), lora)

    def per_sequence(p=f_prompts, r=f_responses):
        for _idx, grads in sequence_gradients(
            model, p, r, names, pad_token_id=pad, temperature=1.0, max_tokens_per_batch=budget
        ):
            del grads

    t_plain = None
    with b.part("plain_forward_backward"):
        plain(prompts[:w], responses[:w])
        b.start_peak()
        t_plain = b.seconds(plain, args.repeat)
        b.save(seconds_plain_forward_backward=t_plain)
        b.log(f"plain batched forward+backward: {t_plain:.2f} s")

    with b.part("per_sequence_gradients"):
        per_sequence(prompts[:w], responses[:w])
        b.start_peak()
        t_ps = b.seconds(per_sequence, args.repeat)
        b.save(
            seconds_per_sequence_gradients=t_ps,
            per_sequence_gradients_per_second=n_fisher / t_ps,
            per_sequence_over_plain_throughput=ratio(t_plain, t_ps),
        )
        b.log(
            f"per-sequence gradients: {t_ps:.2f} s = {n_fisher / t_ps:.1f} seq/s, "
            f"throughput {show(ratio(t_plain, t_ps))} of the plain pass's"
        )

    # ---- Fisher: the factored sketch ---------------------------------------------------------
    sqrt_p = {n: step.denominator[n].double().rsqrt() for n in names}
    sketch = factored_sketch(model, sqrt_p, fisher)
    kw = dict(pad_token_id=pad, temperature=1.0, max_tokens_per_batch=budget)
    rows = None

    def sketch_all():
        nonlocal rows
        rows = sketch.sketch_all(model, f_prompts, f_responses, **kw)

    with b.part("sketch"):
        sketch.sketch_all(model, prompts[:w], responses[:w], **kw)
        b.start_peak()
        t_sk = b.seconds(sketch_all, args.repeat)
        b.save(
            seconds_sketch=t_sk,
            sketch_sequences_per_second=n_fisher / t_sk,
            sketch_over_plain_cost=ratio(t_sk, t_plain),
            sketch_dim=sketch.dim,
            sketch_side=fisher.sketch_side,
        )
        b.log(f"factored sketch (dim {sketch.dim}): {t_sk:.2f} s = {n_fisher / t_sk:.1f} seq/s")

    # ---- the stores on disk ------------------------------------------------------------------
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_delta_h_fisher_"))
    work.mkdir(parents=True, exist_ok=True)
    n_store = min(args.store_sequences, args.sequences)
    store_bytes = n_store * n_params * 4  # float32 rows, the stage's default gradient_dtype
    b.save(
        store_sequences=n_store,
        store_bytes=store_bytes,
        store_bytes_per_sequence=n_params * 4,
        sketch_bytes_per_sequence=sketch.dim * 4,
    )
    try:
        with b.part("store"):
            sp, sr = prompts[:n_store], responses[:n_store]

            def stage_store(f):
                stream_gradients(model, sp, sr, names, sqrt_p, f, "e", fisher, pad, 1.0, sketch)

            t_stage = fsynced_write(work / "store.h5", stage_store)
            b.save(
                seconds_stage_stream_gradients=t_stage,
                stage_store_gb_per_second=store_bytes / t_stage / 1e9,
                stage_store_sequences_per_second=n_store / t_stage,
            )
            with h5py.File(work / "store.h5", "r") as f:
                host = f["e"][:]  # the rows the stage wrote, written again alone
            (work / "store.h5").unlink()

            def plain_store(f):
                ds = f.create_dataset(
                    "e",
                    shape=host.shape,
                    dtype=host.dtype,
                    chunks=(min(n_store, 64), min(n_params, fisher.block)),
                )
                for s in range(0, n_store, 4):
                    ds[s : s + 4] = host[s : s + 4]

            t_write = fsynced_write(work / "plain.h5", plain_store)
            host = None  # frees the rows
            (work / "plain.h5").unlink()
            b.save(
                seconds_store_write=t_write, store_write_gb_per_second=store_bytes / t_write / 1e9
            )
            b.log(
                f"gradient store ({n_store} rows, {store_bytes / 1e9:.2f} GB): the stage's "
                f"stream_gradients {t_stage:.2f} s; the write alone "
                f"{store_bytes / t_write / 1e9:.2f} GB/s"
            )

        with b.part("sketch_store"):
            if rows is None:
                raise RuntimeError("no sketch rows (the sketch part failed)")
            sk_host = rows.float().cpu().numpy()

            def sketch_store(f):
                chunks = (min(len(sk_host), 64), sk_host.shape[1])
                f.create_dataset("e", data=sk_host, chunks=chunks)

            t_sk_write = fsynced_write(work / "sketch.h5", sketch_store)
            b.save(
                sketch_store_bytes=int(sk_host.nbytes),
                seconds_sketch_write=t_sk_write,
                sketch_write_gb_per_second=sk_host.nbytes / t_sk_write / 1e9,
            )
            b.log(
                f"sketch rows {sk_host.nbytes / 1e9:.3f} GB at "
                f"{sk_host.nbytes / t_sk_write / 1e9:.2f} GB/s"
            )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    peaks = [v for k, v in result.items() if k.startswith("peak_gib_") and v is not None]
    errors = result.get("errors", {})
    b.save(complete=not errors, peak_gib=max(peaks) if peaks else None)
    b.log(f"wrote {out}" + (f"; failed parts: {', '.join(errors)}" if errors else ""))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()

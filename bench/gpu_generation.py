"""Generation with per-token entropy: our static decoder against transformers' generate (GPU).

    python bench/gpu_generation.py [--shape 0.5B] [--prompts 256] [--prompt-len 128] [--new 256]
                                   [--variable-prompts 128] [--variable-max 4096] [--json FILE]

Random-weight Qwen2.5-shaped model (bf16, sdpa), all in one process:
  1. fixed length (no EOS in reach): `model.generate(cache_implementation="static")` (timed after
     a warm-up run that compiles it) against the `hf` engine's static decoder with inline entropy,
     without it, without torch.compile, and with the torch sampler instead of the fused one;
  2. variable length: the LM head gets a bias on EOS so chains stop at random depths (geometric,
     mean ~2k tokens, capped at --variable-max); the static decoder retiring finished rows against
     the same decoder keeping the whole batch to the end (how `generate` runs a batch).
Warm-up runs compile first (torch.compile: a static graph for the first batch size, then one with
a dynamic batch); their seconds are printed apart. Prints generated tokens per second and ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from gpu_common import cuda_seconds, random_qwen

from entroflow.engines import SamplingParams
from entroflow.engines.hf import HFEngine

EOS = 151_645


class _Tok:  # the engine only reads the pad id from its tokenizer
    pad_token_id = 151_643
    eos_token_id = EOS


def engine_run(model, prompts, params, batch_size, eos, **static) -> tuple[float, int, object]:
    engine = HFEngine(model, _Tok(), batch_size=batch_size, eos_token_ids=eos, decoder="static",
                      static_options=static)  # fmt: skip
    torch.cuda.synchronize()
    start = time.perf_counter()
    gens = engine.generate(prompts, params)
    torch.cuda.synchronize()
    return time.perf_counter() - start, sum(len(g.token_ids) for g in gens), gens


def warm_up(model, prompts, n, eos) -> float:
    """Compile everything the timed runs use: the Triton kernels, and torch.compile's graphs
    for the first batch size (static) and for any other (dynamic). Returns the seconds."""
    start = time.perf_counter()
    short = SamplingParams(max_new_tokens=32, record_entropy=True)
    for rows in (n, 8):
        for options in ({}, {"fused_sampler": False}):
            engine_run(model, prompts[:rows], short, n, eos, **options)
    return time.perf_counter() - start


def fixed_length(model, n, prompt_len, new, profile=False, repeat=3) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, 151_000, (n, prompt_len), device=model.device)
    prompts = ids.tolist()
    tokens = n * new

    def hf_generate():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new,
                             min_new_tokens=new, cache_implementation="static",
                             pad_token_id=_Tok.pad_token_id)  # fmt: skip
        return out

    rows = {
        "generate(static): warm-up incl. compile": cuda_seconds(hf_generate, repeat=1, warmup=0),
        "generate(static)": cuda_seconds(hf_generate, repeat=repeat, warmup=0),
    }
    never = [151_935]  # an EOS id the runs below may hit by chance (p ~ 1/151936 per token)
    with_entropy = SamplingParams(max_new_tokens=new, record_entropy=True)
    without = SamplingParams(max_new_tokens=new)
    rows["entroflow warm-up incl. compile"] = warm_up(model, prompts, n, never)
    variants = [
        ("entroflow static decoder + entropy", with_entropy, {}),
        ("entroflow static decoder, no entropy", without, {}),
        ("entroflow + entropy, no torch.compile", with_entropy, {"compile": False}),
        ("entroflow + entropy, torch sampler", with_entropy, {"fused_sampler": False}),
    ]
    times = {name: [] for name, _, _ in variants}
    for _ in range(repeat):  # interleaved, so drifting clocks hit every variant alike
        for name, params, static in variants:
            seconds, generated, _ = engine_run(model, prompts, params, n, never, **static)
            times[name].append(seconds * tokens / generated)  # per `tokens`, had an EOS come
    rows.update({name: float(np.median(t)) for name, t in times.items()})
    base = rows["generate(static)"]
    warm = {name: rows.pop(name) for name in list(rows) if "warm-up" in name}
    for name, seconds in warm.items():
        print(f"  {name}: {seconds:.1f} s")
    print(f"fixed length: {n} prompts x {prompt_len} tokens, {new} new tokens each "
          f"(median of {repeat} runs)")  # fmt: skip
    for name, seconds in rows.items():
        print(f"  {name}: {seconds:.2f} s, {tokens / seconds / 1e3:.1f}k tok/s, "
              f"{base / seconds:.2f}x generate(static)")  # fmt: skip
    overhead = (
        rows["entroflow static decoder + entropy"] / rows["entroflow static decoder, no entropy"]
    )
    print(f"  entropy overhead: {100 * (overhead - 1):+.1f}%")
    if profile:
        short = SamplingParams(max_new_tokens=24, record_entropy=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine_run(model, prompts, short, n, never, cuda_graphs=False)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    return {"seconds": rows, "tokens": tokens}


def variable_length(model, n, prompt_len, max_new) -> dict:
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True,
                             device=model.device, dtype=head.weight.dtype)  # fmt: skip
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[EOS] = 4.3  # p(EOS) ~ e^4.3 / 151936 ~ 5e-4 per token
    model.set_output_embeddings(biased)
    torch.manual_seed(1)
    prompts = torch.randint(0, 151_000, (n, prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=max_new, record_entropy=True, seed=3)
    print(f"  warm-up incl. compile (head with a bias): {warm_up(model, prompts, n, [EOS]):.1f} s")
    retire_s, retire_tokens, gens = engine_run(model, prompts, params, n, [EOS])
    keep_s, keep_tokens, _ = engine_run(
        model, prompts, params, n, [EOS], min_bucket=n, check_every=max_new
    )
    lengths = np.array([len(g.token_ids) for g in gens])
    print(f"variable length: {n} prompts, EOS at depth p50 {np.median(lengths):.0f}, "
          f"max {lengths.max()}, {np.mean(lengths == max_new):.0%} reach {max_new}")  # fmt: skip
    print(
        f"  retiring finished rows: {retire_s:.1f} s ({retire_tokens / retire_s / 1e3:.1f}k tok/s)"
    )
    print(f"  whole batch to the end: {keep_s:.1f} s ({keep_tokens / keep_s / 1e3:.1f}k tok/s)")
    print(f"  speed-up from retiring: {keep_s / retire_s:.2f}x")
    model.set_output_embeddings(head)
    return {"retire_s": retire_s, "keep_s": keep_s, "tokens": int(retire_tokens),
            "lengths_p50": float(np.median(lengths)), "lengths_max": int(lengths.max())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="0.5B")
    parser.add_argument("--prompts", type=int, default=256, help="0: skip the fixed-length case")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--variable-prompts", type=int, default=128, help="0: skip that case")
    parser.add_argument("--variable-max", type=int, default=4096)
    parser.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of 24 eager steps"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"Qwen2.5-{args.shape} shape")
    model = random_qwen(args.shape)
    result = {"device": torch.cuda.get_device_name(), "shape": args.shape}
    if args.prompts:
        result["fixed"] = fixed_length(model, args.prompts, args.prompt_len, args.new, args.profile)
    if args.variable_prompts:
        result["variable"] = variable_length(
            model, args.variable_prompts, args.prompt_len, args.variable_max
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Continuous batching in the static decoder: refilling finished rows against only retiring them.

    python bench/static_refill.py [--prompts 256] [--rows 32] [--max-new 512] [--mean-length 128]
                                  [--shape tiny | 0.5B | 1.5B | 8B] [--hf-continuous] [--json PATH]

A random-weight Qwen2-architecture model (CPU: a tiny shape in fp32; CUDA: --shape in bf16) whose
LM head has a bias on EOS, so chains of thought stop at geometric depths (mean --mean-length,
capped at --max-new: a long tail). The same prompts, sampled, decoded in one process by
  - retire: the `hf` engine's static decoder in batches of --rows, finished rows retired into
    smaller batches (what `refill_queue: 0` does);
  - refill: one call over all prompts through --rows rows, each finished row prefilled with the
    next waiting prompt (`refill_queue` > 0);
  - hf_continuous (--hf-continuous): transformers' own continuous batching (`generate_batch`);
    its failure, if any, is recorded rather than raised.
Prints seconds, generated tokens/s and the row utilisation of our two modes (generated tokens /
rows x decode steps, counted on the decode step), ratios against retire; on CUDA also the
fraction of the memory-bandwidth roofline (weights read once per step at the fewest steps the
tokens need, plus each token's K/V context once; --bandwidth in TB/s). Writes
bench/results/static_refill.json (CPU) or bench/results/gpu_static_refill.json (CUDA).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from bench_results import machine, write_result
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from entroflow.engines import SamplingParams, static_decode
from entroflow.engines.hf import HFEngine

# Qwen2.5 0.5B / 1.5B, and Qwen3-8B's dimensions (without its q/k norms): config.json of each.
SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "0.5B": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "1.5B": dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
    "8B": dict(vocab_size=151_936, hidden_size=4096, intermediate_size=12288,
               num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}  # fmt: skip
PAD, EOS = 0, 1


class _Tok:  # the engine reads only the pad id from its tokenizer
    pad_token_id = PAD
    eos_token_id = EOS


def biased_model(shape: str, mean_length: int, device: str) -> Qwen2ForCausalLM:
    """Random weights; the head's EOS bias makes p(EOS) ~ 1 / mean_length per token."""
    config = Qwen2Config(max_position_embeddings=65_536, tie_word_embeddings=False,
                         eos_token_id=EOS, pad_token_id=PAD, **SHAPES[shape])  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
        head = model.lm_head
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=dtype)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        logits = model(torch.randint(2, config.vocab_size, (4, 32), device=device)).logits
        # p(EOS) = e^b / Σ e^logits: b from the typical log-partition of the random head
        log_z = torch.logsumexp(logits.float(), -1).mean().item()
        biased.bias[EOS] = log_z - math.log(mean_length)
    model.lm_head = biased
    return model


class StepCounter:
    """Counts decode steps and rows x steps on StaticDecoder._step (the mode's work)."""

    def __init__(self):
        self.steps = self.row_steps = 0
        self._original = static_decode.StaticDecoder._step

    def __enter__(self):
        counter = self

        def counted(decoder, batch, column):
            counter.steps += 1
            counter.row_steps += batch.size
            return counter._original(decoder, batch, column)

        static_decode.StaticDecoder._step = counted
        return self

    def __exit__(self, *exc):
        static_decode.StaticDecoder._step = self._original


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours(model, prompts, params, rows, refill, device) -> dict:
    engine = HFEngine(model, _Tok(), batch_size=rows, eos_token_ids=[EOS], decoder="static",
                      static_options={"refill": refill})  # fmt: skip
    synchronize(device)
    with StepCounter() as counter:
        start = time.perf_counter()
        gens = engine.generate(prompts, params)
        synchronize(device)
        seconds = time.perf_counter() - start
    lengths = np.array([len(g.token_ids) for g in gens])
    return {
        "seconds": seconds,
        "tokens": int(lengths.sum()),
        "tokens_per_s": float(lengths.sum() / seconds),
        "decode_steps": counter.steps,
        "row_utilisation": float(lengths.sum() / counter.row_steps),
        "lengths": lengths,
    }


def hf_continuous(model, prompts, max_new: int, device) -> dict:
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    try:
        synchronize(device)
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config)
        synchronize(device)
        seconds = time.perf_counter() - start
    except Exception as error:  # an API or backend it does not support here: say so
        return {"error": f"{type(error).__name__}: {error}"[:500]}
    lengths = np.array([len(out.generated_tokens) for out in outputs.values()])
    tokens = int(lengths.sum())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "lengths": lengths}  # fmt: skip


def roofline_fraction(model, result: dict, prompt_len: int, rows: int, bandwidth: float) -> float:
    """Lower-bound bytes / bandwidth, over the measured seconds."""
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    lengths = result["lengths"].astype(np.float64)
    context = (prompt_len * lengths + lengths * (lengths - 1) / 2).sum()  # tokens read per token
    steps = math.ceil(lengths.sum() / rows)
    return (steps * weight_bytes + context * kv_per_token) / (bandwidth * 1e12) / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-new", type=int, default=512)
    parser.add_argument("--mean-length", type=int, default=128)
    parser.add_argument("--shape", default=None, help="tiny (CPU default) | 0.5B | 1.5B | 8B")
    parser.add_argument("--hf-continuous", action="store_true")
    parser.add_argument("--bandwidth", type=float, default=4.8, help="TB/s (H200: 4.8)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = args.shape or ("0.5B" if device == "cuda" else "tiny")
    model = biased_model(shape, args.mean_length, device)
    torch.manual_seed(1)
    vocab = model.config.vocab_size
    prompts = torch.randint(2, vocab, (args.prompts, args.prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=args.max_new, record_entropy=True, seed=3)
    warm = SamplingParams(max_new_tokens=16, record_entropy=True, seed=3)
    for refill in (False, True):  # compile (CUDA) and the first-call costs, both modes
        ours(model, prompts[: 2 * args.rows], warm, args.rows, refill, device)
    runs = {
        "retire": ours(model, prompts, params, args.rows, False, device),
        "refill": ours(model, prompts, params, args.rows, True, device),
    }
    if args.hf_continuous:
        runs["hf_continuous"] = hf_continuous(model, prompts, args.max_new, device)
    lengths = runs["retire"]["lengths"]
    print(f"{device} {shape}: {args.prompts} prompts through {args.rows} rows; lengths p50 "
          f"{np.median(lengths):.0f}, max {lengths.max()}, "
          f"{np.mean(lengths == args.max_new):.0%} reach {args.max_new}")  # fmt: skip
    for name, run in runs.items():
        if "error" in run:
            print(f"  {name}: failed: {run['error']}")
            continue
        if device == "cuda":
            run["roofline_fraction"] = roofline_fraction(
                model, run, args.prompt_len, args.rows, args.bandwidth
            )
        run["speedup_vs_retire"] = runs["retire"]["seconds"] / run["seconds"]
        extra = (
            f", row utilisation {run['row_utilisation']:.2f}" if "row_utilisation" in run else ""
        )
        print(f"  {name}: {run['seconds']:.2f} s, {run['tokens_per_s']:.0f} tok/s{extra}, "
              f"{run['speedup_vs_retire']:.2f}x retire")  # fmt: skip
    for run in runs.values():
        run.pop("lengths", None)
    name = "gpu_static_refill" if device == "cuda" else "static_refill"
    result = {
        "name": name,
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "shape": shape,
        "settings": vars(args),
        "lengths_p50": float(np.median(lengths)),
        "lengths_max": int(lengths.max()),
        "reach_max_new": float(np.mean(lengths == args.max_new)),
        "runs": runs,
        "speedup_refill_vs_retire": runs["refill"]["speedup_vs_retire"],
    }
    default = Path(__file__).with_name("results") / f"{name}.json"  # from any working directory
    print("wrote", write_result(args.json or default, result))


if __name__ == "__main__":
    main()

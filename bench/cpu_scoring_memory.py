"""Peak memory (RSS) of the scorer against a bare forward pass, on CPU.

    python bench/cpu_scoring_memory.py [--vocab 50000] [--batch 8] [--tokens 1024]

A random-weight tiny Qwen3 model with a 50k vocabulary (fp32). Each measurement runs in its own
process (peak RSS only grows): the model alone, `model(input_ids).logits` (the bare forward:
fp32 logits for every position), and entroflow's scorer (`score_responses`, chunked head) on the
same batch. Prints peak RSS (VmHWM) and the ratio scorer / bare.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(what: str, vocab: int, batch: int, tokens: int) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=4096)  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    ids = torch.randint(0, vocab, (batch, tokens))
    out = None
    start = time.perf_counter()
    with torch.inference_mode():
        if what == "bare":
            out = model(input_ids=ids).logits
        elif what == "scorer":
            from entroflow.lm.scoring import score_responses

            rows = ids.numpy()
            out = score_responses(
                model, [r[:1] for r in rows], [r[1:] for r in rows], pad_token_id=0
            )
    seconds = time.perf_counter() - start
    del out
    print(f"{peak_rss_mib():.0f} {seconds:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.vocab, args.batch, args.tokens)
        return
    results = {}
    for what in ("model only", "bare", "scorer"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", what, "--vocab", str(args.vocab),
             "--batch", str(args.batch), "--tokens", str(args.tokens)],
            check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        results[what] = (float(out[0]), float(out[1]))
    print(f"tiny Qwen3 (hidden 256, 4 layers), vocabulary {args.vocab}, batch {args.batch} x "
          f"{args.tokens} tokens, fp32, 2 threads; peak RSS per process:")  # fmt: skip
    for what, (rss, seconds) in results.items():
        print(
            f"  {what:10s}: {rss:7.0f} MiB"
            + (f" ({seconds:.2f} s)" if what != "model only" else "")
        )
    bare, scorer = results["bare"][0], results["scorer"][0]
    print(f"  scorer / bare forward: {scorer / bare:.2f}x peak RSS "
          f"(above the model alone: {(scorer - results['model only'][0]) / (bare - results['model only'][0]):.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()

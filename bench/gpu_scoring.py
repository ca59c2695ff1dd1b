"""Fused entropy scoring against a bare forward pass, on random-weight Qwen2.5 shapes (GPU).

    python bench/gpu_scoring.py [--shapes 0.5B 1.5B] [--batches 16x2048 64x2048] [--json FILE]

For each model shape and batch (sequences x tokens, bf16, sdpa) in one process:
  - bare forward: `model(input_ids, attention_mask)`, bf16 logits for every position (HF's pass);
  - body only: the decoder without the LM head (a floor nobody can beat);
  - entroflow scorer (`scoring.batch_scores`, fused Triton head by default on CUDA): entropy and
    log-prob of every token but the first;
  - chunked torch head (the CPU path, on the GPU) and the naive fp32 log_softmax for comparison.
Prints throughput (tokens/s) and peak GPU memory above the weights, with ratios to the bare forward.
Also times the head alone (fused kernel vs a cuBLAS matmul of the same size) for several tile configs.
"""

from __future__ import annotations

import argparse
import json

import torch
from gpu_common import cuda_seconds, out_of_memory, peak_gib, random_qwen

from entroflow.lm import fused_entropy
from entroflow.lm.scoring import batch_scores, decoder_body

CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 128, 8, 2),
    (64, 256, 64, 4, 3),
    (128, 128, 128, 8, 3),
]


def naive_entropy(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1), logp.gather(-1, ids[:, 1:, None])


def head_configs(model, rows: int) -> list[dict]:
    """The fused head alone on `rows` hidden rows, per tile config, against hidden @ Wᵀ (cuBLAS)."""
    weight = model.get_output_embeddings().weight
    hidden = torch.randn(rows, weight.shape[1], device="cuda", dtype=weight.dtype)
    labels = torch.randint(0, weight.shape[0], (rows,), device="cuda")
    flops = 2 * rows * weight.shape[0] * weight.shape[1]
    matmul = cuda_seconds(lambda: hidden @ weight.T, repeat=5)
    out = [{"what": "cuBLAS hidden @ W.T (bf16 logits)", "seconds": matmul,
            "tflops": flops / matmul / 1e12}]  # fmt: skip
    for config in CONFIGS:
        for cols in (2048, 4096):
            try:
                t = cuda_seconds(
                    lambda c=config, s=cols: fused_entropy.fused_entropy_and_logprob(
                        hidden, weight, labels, config=c, cols_per_split=s
                    ),
                    repeat=5,
                )
            except Exception as error:  # a config that does not compile (shared memory)
                print(f"  config {config} cols {cols}: {type(error).__name__}")
                continue
            out.append({"what": f"fused {config} cols/split {cols}", "seconds": t,
                        "tflops": flops / t / 1e12, "vs_matmul": matmul / t})  # fmt: skip
    for row in out:
        print(f"  head {rows} rows: {row['what']}: {row['seconds'] * 1e3:.2f} ms, "
              f"{row['tflops']:.0f} TFLOP/s" + (f", {row['vs_matmul']:.2f}x cuBLAS speed"
                                                if "vs_matmul" in row else ""))  # fmt: skip
    return out


def scoring_case(model, batch: int, length: int) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, 151_000, (batch, length), device="cuda")
    mask = torch.ones_like(ids)
    tokens = batch * (length - 1)
    rows = ids.cpu().numpy()  # numpy token arrays, as the pipeline passes them
    prompts = [row[:1] for row in rows]
    responses = [row[1:] for row in rows]
    body = decoder_body(model)
    runs = {
        "bare forward (bf16 logits)": lambda: model(input_ids=ids, attention_mask=mask).logits,
        "body only (no LM head)": lambda: (
            body(input_ids=ids, attention_mask=mask).last_hidden_state
        ),
        "entroflow scorer (fused)": lambda: batch_scores(model, prompts, responses, pad_token_id=0),
        "entroflow scorer (chunked torch head)": lambda: batch_scores(
            model, prompts, responses, pad_token_id=0, chunk_rows=4096, head_method="chunked"
        ),
        "naive fp32 log_softmax": lambda: naive_entropy(model, ids, mask),
    }
    result = {"batch": f"{batch}x{length}", "runs": {}}
    for name, fn in runs.items():
        with torch.inference_mode():
            if out_of_memory(fn):
                result["runs"][name] = None
                print(f"  {batch}x{length} {name}: out of memory")
                continue
            seconds = cuda_seconds(fn)
            peak = peak_gib(fn)
        result["runs"][name] = {"seconds": seconds, "tokens_per_s": tokens / seconds,
                                "peak_gib": peak}  # fmt: skip
    bare = result["runs"]["bare forward (bf16 logits)"]
    for name, run in result["runs"].items():
        if run is None:
            continue
        ratio = f"{bare['seconds'] / run['seconds']:.2f}x" if bare else "-"
        extra = f"{run['peak_gib'] - bare['peak_gib']:+.2f} GiB" if bare else "-"
        print(f"  {batch}x{length} {name}: {run['tokens_per_s'] / 1e3:.0f}k tok/s "
              f"(throughput {ratio} of bare), peak {run['peak_gib']:.2f} GiB ({extra} vs bare)")  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["0.5B", "1.5B"])
    parser.add_argument("--batches", nargs="+", default=["16x2048", "64x2048"])
    parser.add_argument(
        "--head-rows", type=int, default=32768, help="0: skip the tile-config sweep"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    results = []
    for shape in args.shapes:
        model = random_qwen(shape)
        print(f"Qwen2.5-{shape} shape (random weights, bf16):")
        entry = {"shape": shape, "cases": []}
        if args.head_rows:
            entry["head"] = head_configs(model, args.head_rows)
        for spec in args.batches:
            batch, length = (int(x) for x in spec.split("x"))
            entry["cases"].append(scoring_case(model, batch, length))
        results.append(entry)
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

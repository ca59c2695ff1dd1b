"""Per-sequence gradient throughput against a plain batched forward+backward, same process.

    python bench/per_sequence_gradients.py [--run-dir results/runs/demo] [--step 10] [--n 256]

On the demo checkpoint's first `n` E-batch first draws (from its ΔH file, which only lends its
sequences), 4096-token batches, log-probs accumulated in float64 for both. Times, interleaved over
`repeat` rounds (median): the plain forward+backward (Σ_b S_b, weight gradients), the current
`sequence_gradients` (forward hooks, one backward to the LoRA outputs), and the previous
implementation (full backward hooks + weight gradients) for comparison. Writes
bench/results/per_sequence_gradients.json (`throughput_ratio` = plain / current).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

import numpy as np
import torch
from bench_results import machine, write_result

from entroflow.checkpoint.fisher_run import batch_sequences
from entroflow.estimators.fisher import lora_linears, sequence_gradients
from entroflow.io import read_token_file
from entroflow.lm.batching import pair_batches
from entroflow.lm.checkpoints import load_policy
from entroflow.lm.models import load_tokenizer
from entroflow.lm.scoring import batch_scores


class PreviousHooks:
    """The hooks before issue 21: forward hooks for inputs, full backward hooks for outputs."""

    def __init__(self, targets):
        self.targets, self.inputs, self.grads, self._handles = targets, {}, {}, []

    def __enter__(self):
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_hook(self._save_input(name)))
            self._handles.append(module.register_full_backward_hook(self._per_sample(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _save_input(self, name):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()

        return hook

    def _per_sample(self, name):
        def hook(module, grad_input, grad_output):
            a, e = self.inputs.pop(name), grad_output[0].detach()
            self.grads[name] = torch.einsum("bto,bti->boi", e.double(), a.double())

        return hook


def previous_sequence_gradients(model, prompts, responses, names, pad, max_tokens):
    """The implementation before issue 21: backward hooks, and weight gradients computed too."""
    targets = lora_linears(model, names)
    params = dict(model.named_parameters())
    for batch in pair_batches(prompts, responses, max_tokens):
        with PreviousHooks(targets) as hooks:
            _, logprob = batch_scores(
                model,
                [prompts[i] for i in batch],
                [responses[i] for i in batch],
                pad_token_id=pad,
                accum_dtype=torch.float64,
            )
            torch.autograd.grad(logprob.sum(), [params[n] for n in names])
        yield batch, hooks.grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="results/runs/demo")
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--model", default="resources/models/demo")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default="bench/results/per_sequence_gradients.json")
    args = parser.parse_args()
    table = read_token_file(f"{args.run_dir}/delta_h/checkpoint-{args.step}.h5", root="e_batch")
    first = np.flatnonzero(table["responses/sample_index"] == 0)[: args.n]
    prompts, responses = batch_sequences(table, first)
    tokenizer = load_tokenizer(args.model)
    pad = tokenizer.pad_token_id
    model = load_policy(args.model, f"{args.run_dir}/checkpoint-{args.step}", merge=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    budget = 4096

    def plain():
        for batch in pair_batches(prompts, responses, budget):
            _, logprob = batch_scores(
                model,
                [prompts[i] for i in batch],
                [responses[i] for i in batch],
                pad_token_id=pad,
                accum_dtype=torch.float64,
            )
            torch.autograd.grad(logprob.sum(), [params[n] for n in names])

    def current():
        for _ in sequence_gradients(
            model,
            prompts,
            responses,
            names,
            pad_token_id=pad,
            temperature=1.0,
            max_tokens_per_batch=budget,
        ):
            pass

    def previous():
        for _ in previous_sequence_gradients(model, prompts, responses, names, pad, budget):
            pass

    # the two implementations give the same gradients
    kw = dict(pad_token_id=pad, temperature=1.0, max_tokens_per_batch=budget)
    new = next(iter(sequence_gradients(model, prompts, responses, names, **kw)))[1]
    old = next(iter(previous_sequence_gradients(model, prompts, responses, names, pad, budget)))[1]
    max_rel = max(float((new[n] - old[n]).norm() / old[n].norm()) for n in names)
    times = {"plain": [], "current": [], "previous": []}
    fns = {"plain": plain, "current": current, "previous": previous}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeat):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "machine": machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "sequences": len(prompts),
        "tokens": int(sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))),
        "lora_tensors": len(names),
        "parameters": int(sum(params[n].numel() for n in names)),
        "seconds_plain_forward_backward": med["plain"],
        "seconds_per_sequence_gradients": med["current"],
        "seconds_previous_implementation": med["previous"],
        "throughput_ratio": med["plain"] / med["current"],
        "throughput_ratio_previous": med["plain"] / med["previous"],
        "max_relative_difference_current_vs_previous": max_rel,
        "repeat": args.repeat,
        "all_seconds": times,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=1))
    out = write_result(args.out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Overhead of the step probe (and trace) per GRPO step: the same run with and without it, one process.

    python bench/probe_overhead.py [--model resources/models/demo] [--steps 12]

Prints seconds per step for: bare TRL GRPOTrainer, + entropy trace, + trace and step probe, and
the ratios. Needs the demo model (`make demo` builds it) or any local model folder.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch
from transformers.trainer_callback import PrinterCallback

from entroflow.data.datasets import load_problems
from entroflow.lm.models import load_model, load_tokenizer
from entroflow.training.monitor import EntropyMonitor
from entroflow.training.run import prompts_dataset
from entroflow.training.trainer import RunSettings, build_trainer


def seconds_per_step(model_dir: str, steps: int, mode: str) -> float:
    settings = RunSettings(steps=steps, save_every=steps, prompts_per_step=8, group_size=8, seed=0)
    out = tempfile.mkdtemp()
    tokenizer = load_tokenizer(model_dir)
    problems = load_problems("b", {"preset": "arithmetic", "n": 512, "seed": 9})
    trainer = build_trainer(
        settings, load_model(model_dir), tokenizer, prompts_dataset(problems), out
    )
    trainer.args.save_strategy = "no"
    trainer.remove_callback(PrinterCallback)
    if mode != "bare":
        EntropyMonitor.attach(trainer, trace_dir=f"{out}/trace", probe=(mode == "probe"))
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resources/models/demo")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = {
        mode: seconds_per_step(args.model, args.steps, mode) for mode in ("bare", "trace", "probe")
    }
    print(
        f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, threads {torch.get_num_threads()}, model {args.model}"
    )
    for mode, sec in results.items():
        print(f"{mode:>6}: {sec:.3f} s/step  ({sec / results['bare']:.2f}x bare)")


if __name__ == "__main__":
    main()

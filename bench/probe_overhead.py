"""Overhead of the step probe (and trace) per GRPO step: the same run with and without it, one process.

    python bench/probe_overhead.py [--model resources/models/demo] [--steps 12] [--repeats 2]
        [--out bench/results/probe_overhead.json]

Runs the same Dr.GRPO run (same seed, so the same rollouts and updates) as: bare TRL
GRPOTrainer; + entropy trace; + trace and the step probe with the defaults (every step, all
rollouts); + trace and the probe's cheaper options (a sample of the rollouts, every k-th step).
The modes are interleaved `--repeats` times
after a discarded two-step warm-up run; each mode's seconds per step is the median over repeats.
Beside the wall-clock ratios (noisy: a few % between repeats on a shared CPU), the monitor's own
seconds per step (the callbacks' time, `probe_seconds` in the logs) over the bare step give the
overhead without the noise of the rest of the step. For the sampled probe, its values are
compared step by step with the full probe's (the runs are identical otherwise): the RMS error
against the mean standard error it reported. Writes the figures to `--out` (JSON) and prints them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_results import machine, write_result
from transformers.trainer_callback import PrinterCallback

from entroflow.data.datasets import load_problems
from entroflow.lm.models import load_model, load_tokenizer
from entroflow.training.monitor import EntropyMonitor
from entroflow.training.run import prompts_dataset
from entroflow.training.trainer import RunSettings, build_trainer

# mode -> EntropyMonitor options (None: no monitor)
MODES = {
    "bare": None,
    "trace": dict(probe=False),
    "probe": dict(probe=True),  # the defaults: every step, all rollouts
}


def run_once(model_dir: str, steps: int, monitor: dict | None) -> dict:
    settings = RunSettings(steps=steps, save_every=steps, prompts_per_step=8, group_size=8, seed=0)
    out = tempfile.mkdtemp()
    tokenizer = load_tokenizer(model_dir)
    problems = load_problems("b", {"preset": "arithmetic", "n": 512, "seed": 9})
    trainer = build_trainer(
        settings, load_model(model_dir), tokenizer, prompts_dataset(problems), out
    )
    trainer.args.save_strategy = "no"
    trainer.remove_callback(PrinterCallback)
    if monitor is not None:
        EntropyMonitor.attach(trainer, trace_dir=f"{out}/trace", **monitor)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    logs = [row for row in trainer.state.log_history if "reward" in row]
    shutil.rmtree(out)
    return {
        "seconds_per_step": elapsed / steps,
        "monitor_seconds_per_step": sum(r.get("probe_seconds", 0.0) for r in logs) / steps,
        "probe": [
            {k: r.get(k) for k in ("probe_predicted", "probe_realised", "probe_predicted_se")}
            for r in logs
        ],
    }


def sampled_error(full: list[dict], sampled: list[dict]) -> dict:
    """The sampled probe's values against the full probe's, step by step."""
    pairs = [(f, s) for f, s in zip(full, sampled, strict=True) if s["probe_predicted"] is not None]
    if not pairs:
        return {}
    err = {
        key: float(np.sqrt(np.mean([(s[key] - f[key]) ** 2 for f, s in pairs])))
        for key in ("probe_predicted", "probe_realised")
    }
    return {
        "steps_compared": len(pairs),
        "rms_error_predicted": err["probe_predicted"],
        "rms_error_realised": err["probe_realised"],
        "mean_reported_se_predicted": float(np.mean([s["probe_predicted_se"] for _, s in pairs])),
        "rms_full_predicted": float(
            np.sqrt(np.mean([f["probe_predicted"] ** 2 for f, _ in pairs]))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resources/models/demo")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--sample", type=int, default=16, help="probe_sequences of the sampled mode"
    )
    parser.add_argument("--every", type=int, default=4, help="probe_every of the every-k mode")
    parser.add_argument("--out", default="bench/results/probe_overhead.json")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default, the cores)"
    )
    args = parser.parse_args()
    if args.threads:  # 1 keeps a run measurable while another job holds a core (no spin-waits)
        torch.set_num_threads(args.threads)
    modes = {
        **MODES,
        f"probe_sample{args.sample}": dict(probe=True, probe_sequences=args.sample),
        f"probe_every{args.every}": dict(probe=True, probe_every=args.every),
        f"probe_sample{args.sample}_every{args.every}": dict(
            probe=True, probe_sequences=args.sample, probe_every=args.every
        ),
    }
    run_once(args.model, 2, modes["probe"])  # warm-up: the process's first steps are slower
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit every mode alike
        for mode, options in modes.items():
            runs[mode].append(run_once(args.model, args.steps, options))
            print(f"{mode:>24}: {runs[mode][-1]['seconds_per_step']:.3f} s/step", flush=True)
    step = {m: statistics.median(r["seconds_per_step"] for r in runs[m]) for m in modes}
    monitor = {m: statistics.median(r["monitor_seconds_per_step"] for r in runs[m]) for m in modes}
    # The monitor's seconds over the rest of the same run's step: robust to other jobs that slow
    # the machine down between runs (both sides measured in the same minutes).
    own = {
        m: statistics.median(
            r["monitor_seconds_per_step"] / (r["seconds_per_step"] - r["monitor_seconds_per_step"])
            for r in runs[m]
        )
        for m in modes
    }
    bare = step["bare"]
    result = {
        "name": "probe_overhead",
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "steps": args.steps,
        "repeats": args.repeats,
        "run": "Dr.GRPO, 8 prompts x 8 samples a step, LoRA r = 8, max_new_tokens 96",
        "seconds_per_step": step,
        "seconds_per_step_each_repeat": {
            m: [r["seconds_per_step"] for r in runs[m]] for m in modes
        },
        "ratio": {m: step[m] / bare for m in modes},
        "monitor_seconds_per_step": monitor,
        "monitor_share_of_bare_step": {m: monitor[m] / bare for m in modes},
        "monitor_share_of_own_step_without_it": own,
        "ratio_bare": 1.0,
        "ratio_trace": step["trace"] / bare,
        "ratio_trace_probe": step["probe"] / bare,
        "probe_share_of_bare_step": (monitor["probe"] - monitor["trace"]) / bare,
        "options": {m: o for m, o in modes.items() if o and m not in MODES},
        "sampled_vs_full": {
            m: sampled_error(runs["probe"][0]["probe"], runs[m][0]["probe"])
            for m, o in modes.items()
            if o and o.get("probe_sequences")
        },
    }
    for m in modes:
        if m not in MODES:
            result[f"ratio_trace_{m}"] = step[m] / bare
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result, indent=2)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "seconds_per_step_each_repeat"}, indent=1
        )
    )


if __name__ == "__main__":
    main()

"""One training run end to end: model + dataset -> checkpoints, trace, summary. Resumable."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from entroflow.models import load_model, load_tokenizer
from entroflow.training.monitor import EntropyMonitor
from entroflow.training.trainer import RunSettings, build_trainer, last_checkpoint, run_metadata

log = logging.getLogger(__name__)
LOGGED = (
    "reward",
    "entropy",
    "probe/delta_h_predicted",
    "probe/delta_h_realised",
    "probe/delta_h_cov",
    "probe/seconds",
    "step_time",
)


class StepLog(TrainerCallback):
    """One log line per step with reward, entropy, probe values and timing."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        parts = [f"{k.split('/')[-1]}={logs[k]:.4g}" for k in LOGGED if logs.get(k) is not None]
        elapsed = time.perf_counter() - self.t0
        log.info(
            "step %d/%d  %s  (%.0f s elapsed)",
            state.global_step,
            self.total,
            "  ".join(parts),
            elapsed,
        )


def prompts_dataset(problems: pd.DataFrame, system_prompt: str | None = None):
    from datasets import Dataset

    def messages(text):
        prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return prefix + [{"role": "user", "content": text}]

    return Dataset.from_dict(
        {"prompt": [messages(p) for p in problems["prompt"]], "answer": list(problems["answer"])}
    )


def train_policy(
    settings: RunSettings,
    model_dir: str,
    problems: pd.DataFrame,
    output_dir: str,
    dtype: str = "auto",
    system_prompt: str | None = None,
    resume: bool = True,
    reward_funcs: list | None = None,
) -> dict:
    """Train, writing checkpoints to output_dir/checkpoint-{step} and the trace to output_dir/trace."""
    output = Path(output_dir)
    trace_dir = output / "trace"
    checkpoint = last_checkpoint(output) if resume else None
    if checkpoint is None and trace_dir.exists():
        shutil.rmtree(trace_dir)  # a fresh start: an old trace would mix two runs
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype)
    dataset = prompts_dataset(problems, system_prompt)
    trainer = build_trainer(
        settings, model, tokenizer, dataset, str(output), reward_funcs=reward_funcs
    )
    monitor = EntropyMonitor.attach(
        trainer, trace_dir=str(trace_dir), write_every=settings.trace_every, probe=settings.probe
    )
    trainer.remove_callback(
        PrinterCallback
    )  # raw metric dicts on stdout; StepLog logs a readable line
    trainer.add_callback(StepLog(settings.steps))
    if checkpoint is not None:
        step = int(checkpoint.name.split("-")[1])
        log.info("resuming from %s", checkpoint)
        monitor.writer.truncate_after(step)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    summary = monitor.writer.write_summary(run_metadata(settings, model_dir))
    (output / "run.json").write_text(json.dumps(run_metadata(settings, model_dir), indent=2) + "\n")
    return summary

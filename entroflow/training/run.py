"""One training run end to end: model + dataset -> checkpoints, trace, summary. Resumable."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from entroflow.journal import fingerprint, folder_fingerprint
from entroflow.lm.models import load_model, load_tokenizer
from entroflow.lm.precision import Precision, apply_precision
from entroflow.training.monitor import EntropyMonitor
from entroflow.training.traces import (
    PROBE_COVARIANCE,
    PROBE_PREDICTED,
    PROBE_REALISED,
    TraceWriter,
)
from entroflow.training.trainer import (
    TENSORBOARD_DIR,
    RunSettings,
    build_trainer,
    check_trackers,
    last_checkpoint,
    run_metadata,
)

log = logging.getLogger(__name__)
LOGGED = (
    "reward",
    "entropy",
    PROBE_PREDICTED,
    PROBE_REALISED,
    PROBE_COVARIANCE,
    "probe_seconds",
    "maxent/tau",  # maxent_grpo: the controller's τ, β at this step and its step after it
    "maxent/delta_tau",
    "maxent/beta",
    "maxent/delta_beta",
    "infoseed/seed_loss",  # infoseed_grpo: its auxiliary loss, seed accuracy and subset entropies
    "infoseed/seed_accuracy",
    "infoseed/entropy_original",
    "infoseed/entropy_seeded",
    "step_time",
)


class StepLog(TrainerCallback):
    """One log line per step with reward, entropy, the step probe's values, MaxEnt-GRPO's τ, β
    with their steps, InfoSeed-GRPO's seed loss, accuracy and subset entropies, and timing."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        parts = [f"{k}={logs[k]:.4g}" for k in LOGGED if logs.get(k) is not None]
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


RESUME_KEY = "resume-key.json"  # what the checkpoints in a run folder were made from


def run_key(settings, model_dir, problems, system_prompt, dtype, code) -> str:
    """What a run's checkpoints are made from (the trackers it logs to are not part of it)."""
    model = folder_fingerprint(model_dir) if Path(model_dir).is_dir() else str(model_dir)
    columns = {c: problems[c].astype(str).tolist() for c in sorted(problems.columns)}
    made_from = {k: v for k, v in dataclasses.asdict(settings).items() if k != "report_to"}
    return fingerprint(made_from, model, columns, system_prompt, dtype, code)


def resumable_checkpoint(output: Path, key: str) -> Path | None:
    """The last complete checkpoint, if the run folder's checkpoints were made under `key`."""
    checkpoint = last_checkpoint(output)
    if checkpoint is None:
        return None
    try:
        saved = json.loads((output / RESUME_KEY).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        saved = None
    if saved != key:
        log.warning(
            "%s holds checkpoints made from other settings, model, data or code: training from "
            "scratch",
            output,
        )
        return None
    return checkpoint


def train_policy(settings: RunSettings, *args, **kwargs) -> dict:
    """`run_training` under the run's precision (lm.precision: torch's matmul precision set for
    the run and restored after it)."""
    with apply_precision(settings.precision):
        return run_training(settings, *args, **kwargs)


def run_training(
    settings: RunSettings,
    model_dir: str,
    problems: pd.DataFrame,
    output_dir: str,
    dtype: str = "auto",
    system_prompt: str | None = None,
    resume: bool = True,
    reward_funcs: list | None = None,
    code: str = "",
    threads: int | None = None,
) -> dict:
    """Train, writing checkpoints to output_dir/checkpoint-{step}, the trace to output_dir/trace
    and, with report_to tensorboard, event files to output_dir/tensorboard.

    Resumes from the last complete checkpoint only when it was made from the same settings,
    model, problems and `code` (the rule's code fingerprint); otherwise trains from scratch.
    With `settings.processes` > 1 (or a `deepspeed_config`) the training runs on that many ranks
    under accelerate launch (training.launch; `threads` CPU threads shared among them): this
    process decides whether to resume and clears a stale run, they train, it writes the summary.
    """
    check_trackers(settings.report_to)  # before anything is removed or loaded
    output = Path(output_dir)
    trace_dir = output / "trace"
    key = run_key(settings, model_dir, problems, system_prompt, dtype, code)
    checkpoint = resumable_checkpoint(output, key) if resume else None
    if checkpoint is None:  # a fresh start: old checkpoints, trace or events would mix two runs
        for old in output.glob("checkpoint-*"):
            shutil.rmtree(old)
        shutil.rmtree(trace_dir, ignore_errors=True)
        shutil.rmtree(output / TENSORBOARD_DIR, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / RESUME_KEY).write_text(json.dumps({"key": key}) + "\n")
    args = (settings, model_dir, problems, output, dtype, system_prompt, checkpoint is not None)
    if settings.processes > 1 or settings.deepspeed_config:
        from entroflow.training.launch import launch_processes

        launch_processes(*args, reward_funcs=reward_funcs, threads=threads)
    else:
        train_rank(*args, reward_funcs=reward_funcs)
    metadata = run_metadata(settings, model_dir)
    summary = TraceWriter(trace_dir).write_summary(metadata)
    (output / "run.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return summary


def train_rank(
    settings: RunSettings,
    model_dir: str,
    problems: pd.DataFrame,
    output: Path,
    dtype: str = "auto",
    system_prompt: str | None = None,
    resume: bool = True,
    reward_funcs: list | None = None,
) -> None:
    """The training itself, on this process (one rank of several under training.launch):
    resumes from the last complete checkpoint in `output` when `resume`. Only the main process
    writes the trace (the monitor's writer) and, through the Trainer, the checkpoints."""
    checkpoint = last_checkpoint(output) if resume else None
    tokenizer = load_tokenizer(model_dir)
    local_rank = os.environ.get("LOCAL_RANK")  # set by accelerate launch (torchrun)
    device = f"cuda:{local_rank}" if local_rank and torch.cuda.is_available() else "auto"
    precision = Precision.of(settings.precision)
    model = load_model(
        model_dir,
        dtype=precision.dtype or dtype,
        device=device,
        quantize=settings.lora_quantize,
        double_quant=settings.lora_double_quant,
    )
    dataset = prompts_dataset(problems, system_prompt)
    trainer = build_trainer(
        settings, model, tokenizer, dataset, str(output), reward_funcs=reward_funcs
    )
    main = trainer.accelerator.is_main_process
    if trainer.accelerator.num_processes > 1:
        state = trainer.accelerator.state
        log.info(
            "%d processes (%s, %s)", state.num_processes, state.distributed_type, state.backend
        )
    monitor = EntropyMonitor.attach(
        trainer,
        trace_dir=str(output / "trace") if main else None,  # one writer: the main process
        write_every=settings.trace_every,
        probe=settings.probe,
        probe_every=settings.probe_every,
        probe_sequences=settings.probe_sequences,
        accum_dtype=precision.entropy_torch_dtype,
    )
    trainer.remove_callback(
        PrinterCallback
    )  # raw metric dicts on stdout; StepLog logs a readable line
    trainer.add_callback(StepLog(settings.steps))
    step = int(checkpoint.name.split("-")[1]) if checkpoint is not None else 0
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    if monitor.writer is not None:  # the trace up to the checkpoint (a fresh start: none)
        monitor.writer.truncate_after(step)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

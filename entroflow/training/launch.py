"""A training run on several processes: `accelerate launch` runs this module on every rank.

`train_policy` (training.run) decides, in its one process, whether the run resumes and clears a
stale run folder; with `processes` > 1 it then writes the job file `launch/job.json` in the run
folder (the settings, paths and what the ranks need; the problems beside it as Parquet) and runs

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1 ...
        -m entroflow.training.launch results/runs/{run}/launch/job.json

(DDP: NCCL on GPUs, gloo on CPU; with `deepspeed_config`, `--use_deepspeed
--deepspeed_config_file <path>` instead). Every rank runs `main`: it trains with
`training.run.train_rank`, resuming from the run folder's last complete checkpoint when the job
says so. Only the main process writes the trace, the probe's values, the checkpoints (the
Trainer's `should_save`) and the logs' trackers; the summary and run.json are written by the
launching process once the ranks have finished.

The job file is also the way onto several nodes (README, "Several GPUs"): run the same module
under `accelerate launch --num_machines M --machine_rank ...` on each node.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd

from entroflow.errors import EntroflowError
from entroflow.training.settings import RunSettings

log = logging.getLogger(__name__)
rank_log = logging.getLogger("entroflow.ranks")
JOB_DIR = "launch"  # in the run folder: job.json and problems.parquet


def check_deepspeed_config(path: str | None) -> None:
    """One line naming `deepspeed_config` when its file is missing or deepspeed is absent."""
    if path is None:
        return
    if not Path(path).expanduser().is_file():
        raise EntroflowError(f"deepspeed_config: file not found: {path}")
    try:
        stage = json.loads(Path(path).expanduser().read_text()).get("zero_optimization", {})
        stage = stage.get("stage") if isinstance(stage, dict) else None
    except (ValueError, AttributeError) as err:
        raise EntroflowError(f"deepspeed_config: {path}: not a JSON object: {err}") from None
    if stage == 3:
        raise EntroflowError(
            f"deepspeed_config: {path}: ZeRO stage 3 is not supported (the trace and the step "
            "probe run forward passes on the main process alone); use stage 1 or 2"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise EntroflowError(
            "deepspeed_config: needs the deepspeed package (pip install deepspeed)"
        )


def free_port() -> int:
    """A free TCP port for the ranks' rendezvous on this machine (two runs on one node, or a
    test beside a job, must not share accelerate's default 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(
    processes: int,
    job_file: str | os.PathLike,
    deepspeed_config: str | None = None,
    cuda: bool | None = None,
    threads_per_process: int = 1,
    port: int | None = None,
) -> list[str]:
    """The `accelerate launch` command that runs this module on `processes` ranks of one node."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if deepspeed_config is not None:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_config)]
    else:
        # --multi_gpu is accelerate's torchrun launcher; on CPU the ranks use gloo (see grpo_config).
        cmd += ["--multi_gpu"]
    cmd += [
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--num_cpu_threads_per_process",
        str(max(threads_per_process, 1)),
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port if port is not None else free_port()),
    ]
    if deepspeed_config is None:
        cmd += ["--mixed_precision", "no"]  # the Trainer's own bf16 setting (grpo_config)
    return cmd + ["-m", "entroflow.training.launch", str(job_file)]


def function_path(func) -> str:
    """'module:name' of a module-level function (a reward function the ranks import)."""
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if not module or module == "__main__" or "." in name or "<" in name:
        raise EntroflowError(
            f"reward function {func!r}: several processes need a module-level function (the "
            "ranks import it by name)"
        )
    return f"{module}:{name}"


def import_function(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def write_job(
    settings: RunSettings,
    model_dir: str,
    problems: pd.DataFrame,
    output: Path,
    dtype: str,
    system_prompt: str | None,
    resume: bool,
    reward_funcs: list | None,
) -> Path:
    folder = output / JOB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    problems.to_parquet(folder / "problems.parquet")
    job = {
        "settings": dataclasses.asdict(settings),
        "model_dir": str(model_dir),
        "problems": str(folder / "problems.parquet"),
        "output_dir": str(output),
        "dtype": dtype,
        "system_prompt": system_prompt,
        "resume": resume,
        "reward_funcs": None if reward_funcs is None else [function_path(f) for f in reward_funcs],
    }
    path = folder / "job.json"
    path.write_text(json.dumps(job, indent=2) + "\n")
    return path


def launch_processes(
    settings: RunSettings,
    model_dir: str,
    problems: pd.DataFrame,
    output: Path,
    dtype: str = "auto",
    system_prompt: str | None = None,
    resume: bool = True,
    reward_funcs: list | None = None,
    threads: int | None = None,
) -> None:
    """Train on `settings.processes` ranks of this machine; returns when all have finished."""
    check_deepspeed_config(settings.deepspeed_config)
    job = write_job(
        settings, model_dir, problems, output, dtype, system_prompt, resume, reward_funcs
    )
    threads = threads or os.cpu_count() or 1
    cmd = accelerate_command(
        settings.processes,
        job,
        settings.deepspeed_config,
        threads_per_process=threads // settings.processes,
    )
    log.info("launching %d processes: %s", settings.processes, " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The ranks import entroflow (and a test's reward functions) as this process does.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
    # The ranks' lines go through this process's log (the rule's log file), in order.
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            if line.strip():
                rank_log.info("%s", line.rstrip())
    if proc.returncode != 0:
        raise EntroflowError(
            f"processes: training on {settings.processes} processes failed (exit code "
            f"{proc.returncode}); the ranks' errors are in the log above"
        )


def main(argv: list[str] | None = None) -> None:
    """One rank: the job file's run, trained by `training.run.train_rank`."""
    from entroflow.logs import setup_logging
    from entroflow.training.run import train_rank

    (job_file,) = argv if argv is not None else sys.argv[1:]
    job = json.loads(Path(job_file).read_text())
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(None)
    if rank != 0:  # one rank's log lines are enough; warnings and errors from all
        logging.getLogger().setLevel(logging.WARNING)
    funcs = job["reward_funcs"]
    train_rank(
        RunSettings(**job["settings"]),
        job["model_dir"],
        pd.read_parquet(job["problems"]),
        Path(job["output_dir"]),
        dtype=job["dtype"],
        system_prompt=job["system_prompt"],
        resume=job["resume"],
        reward_funcs=None if funcs is None else [import_function(f) for f in funcs],
    )


if __name__ == "__main__":
    main()

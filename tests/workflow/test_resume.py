"""Preemption: generation and scoring jobs SIGKILLed part-way through a real Snakemake run resume
from their saved batches on the retry, and the final files equal an uninterrupted run's."""

from __future__ import annotations

import os
import textwrap

import h5py
import numpy as np
import pytest
import yaml

from tests.conftest import save_tiny_model, tiny_config
from tests.workflow.test_workflow import ROOT, snakemake

# Imported by every Python process of the killed run (PYTHONPATH): after the N-th saved batch of
# a job, the job's process SIGKILLs itself once (a marker file per job keeps the retry alive).
KILLER = textwrap.dedent(
    """
    import os, signal
    from pathlib import Path
    os.environ.setdefault("ENTROFLOW_CONTROLLER_PID", str(os.getpid()))  # the first: snakemake
    if os.environ.get("ENTROFLOW_KILL_AFTER_SAVES"):
        from entroflow.journal import BatchJournal

        _save = BatchJournal.save

        def save(self, index, arrays):
            _save(self, index, arrays)
            mark = Path(os.environ["ENTROFLOW_KILL_MARKS"]) / self.folder.name
            saved = len(list(self.folder.glob("batch-*.npz")))
            if saved >= int(os.environ["ENTROFLOW_KILL_AFTER_SAVES"]) and not mark.exists():
                mark.touch()
                if os.environ.get("ENTROFLOW_KILL_CONTROLLER"):  # kill -9 of snakemake itself
                    os.kill(int(os.environ["ENTROFLOW_CONTROLLER_PID"]), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

        BatchJournal.save = save
    """
)

TARGET = "results/x/shards/scored.0-of-1.h5"


def read_all(path):
    """Every dataset and attribute of an HDF5 file, except the creation time."""
    out = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
        out["attrs"] = {k: v for k, v in f.attrs.items() if k != "created"}
    return out


def killer_env(tmp_path, marks, **extra) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    marks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    pythonpath = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)
    return {
        "PYTHONPATH": pythonpath,
        "ENTROFLOW_KILL_AFTER_SAVES": "2",
        "ENTROFLOW_KILL_MARKS": str(marks),
        **extra,
    }


def write_config(tmp_path, tiny_tokenizer):
    model_dir = save_tiny_model(tmp_path / "tiny-model", tiny_tokenizer, seed=6)
    cfg = tiny_config(
        model_dir,
        12,
        {
            "x": {
                "batch_size": 4,  # 2 prompts x 2 samples per saved batch: 6 batches
                "sampling": {"max_new_tokens": 16, "samples_per_prompt": 2, "seed": 3},
            }
        },
    )
    cfg["scoring"] = {"max_tokens_per_batch": 64}  # a few responses per scoring batch
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def runner(config):
    def run(work, *extra, env=None, target=TARGET):
        return snakemake(
            *([target] if target else []),
            "--cores",
            "1",
            *extra,
            "--configfile",
            str(config),
            "--directory",
            str(work),
            "--snakefile",
            str(ROOT / "workflow/Snakefile"),
            env=env,
        )

    return run


@pytest.mark.workflow
def test_killed_generation_and_scoring_resume_to_the_same_files(tmp_path, tiny_tokenizer):
    run = runner(write_config(tmp_path, tiny_tokenizer))

    plain = run(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]

    env = killer_env(tmp_path, marks := tmp_path / "marks")
    work = tmp_path / "killed"
    killed = run(work, "--retries", "1", env=env)
    out = killed.stdout + killed.stderr
    assert killed.returncode == 0, out[-4000:]
    # Both jobs were killed once, mid-way, and their retries resumed from the saved batches.
    assert sorted(p.name for p in marks.iterdir()) == [
        "generated.0-of-1.h5.partial",
        "scored.0-of-1.h5.partial",
    ]
    assert out.count("Trying to restart job") == 2, out[-4000:]
    for name in ("generate_responses", "score_entropy"):
        log = (work / f"logs/{name}/x.0-of-1.log").read_text()
        assert "resuming: 2 batches already saved" in log, log
    assert not list((work / "results/x/shards").glob("*.partial"))

    for name in ("generated.0-of-1.h5", "scored.0-of-1.h5"):
        expected = read_all(tmp_path / "plain/results/x/shards" / name)
        got = read_all(work / "results/x/shards" / name)
        assert expected.keys() == got.keys()
        assert expected.pop("attrs") == got.pop("attrs")
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name}:{key}")
    responses = read_all(work / "results/x/shards/scored.0-of-1.h5")
    pairs = sorted(
        zip(responses["responses/prompt_index"], responses["responses/sample_index"], strict=True)
    )
    assert pairs == [(p, s) for p in range(12) for s in range(2)]  # none lost or duplicated


@pytest.mark.workflow
def test_a_killed_controller_resumes_after_unlock(tmp_path, tiny_tokenizer):
    """kill -9 of snakemake itself leaves its lock: the README's way back is `--unlock`, then
    the same command, which reruns the interrupted job from its saved batches."""
    run = runner(write_config(tmp_path, tiny_tokenizer))
    work = tmp_path / "killed"
    env = killer_env(tmp_path, tmp_path / "marks", ENTROFLOW_KILL_CONTROLLER="1")
    killed = run(work, env=env)
    assert killed.returncode != 0 and not (work / TARGET).exists()
    locked = run(work)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    assert run(work, "--unlock", target=None).returncode == 0
    again = run(work)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    log = (work / "logs/generate_responses/x.0-of-1.log").read_text()
    assert "resuming: 2 batches already saved" in log, log


# Ctrl-C in a terminal: SIGINT to snakemake and to its running job, here once the job has written
# its output (download_dataset: the parquet file, before its provenance record).
INTERRUPTER = textwrap.dedent(
    """
    import os, signal, time
    os.environ.setdefault("ENTROFLOW_CONTROLLER_PID", str(os.getpid()))  # the first: snakemake
    if os.environ.get("ENTROFLOW_INTERRUPT_AFTER_OUTPUT"):
        import entroflow.provenance

        # A Ctrl-C in a terminal; a background shell (e.g. a CI runner's `cmd &`) starts its
        # children with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def write_record(output, configs, spec):
            os.kill(int(os.environ["ENTROFLOW_CONTROLLER_PID"]), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)

        entroflow.provenance.write_record = write_record
    """
)


@pytest.mark.workflow
def test_an_interrupted_job_reruns_from_another_directory(tmp_path, tiny_tokenizer):
    """Ctrl-C leaves the running job's output behind, marked incomplete. The next run reruns
    the job (profiles/default: rerun-incomplete) instead of stopping with Snakemake's
    IncompleteFilesException, also when it is started outside the repository with --snakefile:
    Snakemake finds the profile next to the Snakefile (workflow/profiles/default)."""
    config = write_config(tmp_path, tiny_tokenizer)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(INTERRUPTER)
    pythonpath = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = "resources/datasets/arith.parquet"
    args = (target, "--cores", "1", "--configfile", str(config), "--directory", str(work))
    args += ("--snakefile", str(ROOT / "workflow/Snakefile"))

    env = {"PYTHONPATH": pythonpath, "ENTROFLOW_INTERRUPT_AFTER_OUTPUT": "1"}
    interrupted = snakemake(*args, cwd=elsewhere, env=env)
    assert interrupted.returncode != 0, interrupted.stderr[-3000:]
    assert (work / target).exists() and not (work / f"{target}.made-by.json").exists()
    assert list((work / ".snakemake/incomplete").iterdir())  # Snakemake's marker

    again = snakemake(*args, cwd=elsewhere)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "IncompleteFilesException" not in output, output[-3000:]
    assert "Forced execution" in output, output[-3000:]
    assert (work / f"{target}.made-by.json").exists()

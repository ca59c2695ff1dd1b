"""Detailed logs of the checkpoint stages (runs.<name>.delta_h.logging, .fisher.logging): each
level and switch writes exactly the files the README lists, compressed files read back, the
folder rotates to max_files, and the stages' result files are the same at every level."""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from entroflow.checkpoint.delta_h_result import DeltaHResult
from entroflow.checkpoint.delta_h_run import estimate_delta_h
from entroflow.checkpoint.detailed_log import StageLog, log_folder
from entroflow.checkpoint.fisher_run import fisher_kernel_stage
from entroflow.checkpoint.settings import (
    DeltaHSettings,
    FisherSettings,
    LoggingSettings,
    RunShape,
    recorded_settings,
    stage_params,
)
from entroflow.config import load_config
from tests.conftest import make_tiny_model

# The files of README, "Detailed logs of a checkpoint stage", after the run's stamp.
DELTA_H_FILES = {
    "detailed": {
        "update.json",
        "growth.jsonl",
        "eta_sweep.jsonl",
        "e_sequences.jsonl",
        "u_sequences.jsonl",
    },
    "log_tokens": {"e_tokens.jsonl", "u_tokens.jsonl"},
    "log_sequences": {"texts.jsonl"},
    "log_raw_tensors": {"update_stats.npz", "update.pt", "bootstrap.npz"},
}
FISHER_FILES = {
    "detailed": {"checks.json", "sequences.jsonl"},
    "log_tokens": {"tokens.jsonl"},
    "log_sequences": {"texts.jsonl"},
    "log_raw_tensors": {"kernel.npz"},
}
DEBUG = {"detailed", "log_tokens", "log_sequences", "log_raw_tensors"}
TIMING = {"created", "seconds", "forward_equivalents", "gradient_seconds", "kernel_seconds"}
TIMING |= {"sequences_per_second"}
ROOT = Path(__file__).resolve().parents[2]
STAMP = re.compile(r"^\d{8}T\d{6}\.\d{3}Z\.")


def expected(files: dict, groups) -> set[str]:
    return set().union(*(files[g] for g in groups)) if groups else set()


def names(folder) -> set[str]:
    """The folder's file names without their stamps."""
    if not folder.exists():
        return set()
    return {STAMP.sub("", p.name) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def stage_inputs(tiny_tokenizer):
    """A tiny LoRA policy with AdamW state, prompts and a run whose U-batch has a signal."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_model(tiny_tokenizer, seed=3), LoraConfig(r=2, target_modules=["q_proj"])
    ).eval()
    g = torch.Generator().manual_seed(0)
    adam_state = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.normal_(0, 0.1, generator=g)
            adam_state[n] = {
                "exp_avg": 1e-3 * torch.randn(p.shape, generator=g),
                "exp_avg_sq": 1e-6 * torch.rand(p.shape, generator=g),
                "step": 3.0,
                "lr": 1e-2,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.0,
            }
    prompts = [f"{a} + {a + 3} =" for a in range(10, 22)]
    answers = [str(2 * a + 3) for a in range(10, 22)]
    problems = pd.DataFrame({"prompt": prompts, "answer": answers, "id": map(str, range(12))})
    prompt_ids = [tiny_tokenizer(p)["input_ids"] for p in prompts]
    run = RunShape("dr_grpo", 4, 6, 1.0, 0.0)
    return model, tiny_tokenizer, problems, prompt_ids, adam_state, run


def run_stages(inputs, folder, **logging_keys):
    """Both stages with `logging_keys`; their files written as the rule scripts write them."""
    model, tokenizer, problems, prompt_ids, adam_state, run = inputs
    settings = DeltaHSettings(
        e_prompts=6,
        e_samples_max=2,
        target_half_width=1e-6,  # grows once: two rounds
        u_prompts=2,
        eta_scale=[0.5, 1.0, 2.0],
        bootstrap=20,
        logging=logging_keys,
    )
    logs = folder / "logs"
    with pytest.MonkeyPatch.context() as patch:  # a random tiny model answers nothing right:
        patch.setattr(  # alternate rewards so that every U group has a gradient
            "entroflow.checkpoint.replay.correctness_rewards",
            lambda texts, answers: [float(i % 2) for i in range(len(texts))],
        )
        delta_h = estimate_delta_h(
            model,
            tokenizer,
            problems,
            prompt_ids,
            adam_state,
            run,
            settings,
            log_folder(logs / "estimate_delta_h/r.1.log"),
        )
    delta_h.settings = recorded_settings({"delta_h": {"logging": logging_keys}})
    delta_h.write(folder / "delta_h.h5")
    fisher = fisher_kernel_stage(
        copy.deepcopy(model).double(),
        tokenizer,
        DeltaHResult.read(folder / "delta_h.h5"),
        run,
        FisherSettings(block=64, sketch_side=2, logging=logging_keys),
        folder / "gradients.h5",
        log_folder(logs / "compute_fisher_kernel/r.1.log"),
    )
    fisher.settings = recorded_settings({"fisher": {"logging": logging_keys}})
    fisher.write(folder / "kernel.h5")
    return logs / "estimate_delta_h/r.1", logs / "compute_fisher_kernel/r.1"


def same_file(a, b) -> None:
    """Every dataset bit for bit and every attribute but the timings."""
    with h5py.File(a) as fa, h5py.File(b) as fb:
        listed_a, listed_b = [], []
        fa.visit(listed_a.append)
        fb.visit(listed_b.append)
        assert listed_a == listed_b
        for name in listed_a:
            if isinstance(fa[name], h5py.Dataset):
                x, y = fa[name][()], fb[name][()]
                assert x.dtype == y.dtype and x.shape == y.shape, name
                same = (
                    x.tolist() == y.tolist() if x.dtype.kind == "O" else x.tobytes() == y.tobytes()
                )
                assert same, name
        keys = (set(fa.attrs) | set(fb.attrs)) - TIMING
        assert {k: str(fa.attrs.get(k)) for k in keys} == {k: str(fb.attrs.get(k)) for k in keys}


@pytest.fixture(scope="module")
def standard_run(stage_inputs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("standard")
    return folder, run_stages(stage_inputs, folder)


@pytest.mark.parametrize(
    ("keys", "groups"),
    [
        ({"level": "minimal"}, set()),
        ({"level": "detailed"}, {"detailed"}),
        ({"level": "debug"}, DEBUG),
        ({"level": "standard", "log_sequences": True}, {"log_sequences"}),
        ({"level": "detailed", "log_tokens": True}, {"detailed", "log_tokens"}),
        ({"level": "debug", "log_raw_tensors": False}, DEBUG - {"log_raw_tensors"}),
    ],
)
def test_detailed_logging_writes_the_documented_files_and_keeps_the_numbers(
    stage_inputs, standard_run, tmp_path, caplog, keys, groups
):
    standard, (standard_delta_h, standard_fisher) = standard_run
    assert names(standard_delta_h) == names(standard_fisher) == set()  # standard: nothing
    with caplog.at_level(logging.INFO):
        delta_h_logs, fisher_logs = run_stages(stage_inputs, tmp_path, **keys)
    stage_lines = [r for r in caplog.records if r.name.startswith("entroflow.checkpoint")]
    if keys["level"] == "minimal":  # the rule log keeps warnings only
        assert all(r.levelno >= logging.WARNING for r in stage_lines)
    else:
        assert any(r.levelno == logging.INFO for r in stage_lines)
    assert names(delta_h_logs) == expected(DELTA_H_FILES, groups)
    assert names(fisher_logs) == expected(FISHER_FILES, groups)
    same_file(standard / "delta_h.h5", tmp_path / "delta_h.h5")
    same_file(standard / "kernel.h5", tmp_path / "kernel.h5")


def test_detailed_logging_debug_records(stage_inputs, tmp_path):
    """The records hold what they say: rounds, η, sequences, tokens, tensors; gzip reads back."""
    delta_h_logs, fisher_logs = run_stages(stage_inputs, tmp_path, level="debug", compress=True)
    files = {STAMP.sub("", p.name): p for p in [*delta_h_logs.iterdir(), *fisher_logs.iterdir()]}
    text = [n for n in files if n.endswith((".json.gz", ".jsonl.gz"))]
    assert text and all(
        n.removesuffix(".gz") in names_of(DELTA_H_FILES, FISHER_FILES) for n in text
    )

    def lines(name):
        with gzip.open(files[name], "rt") as f:
            return [json.loads(line) for line in f]

    result = DeltaHResult.read(tmp_path / "delta_h.h5")
    rounds = lines("growth.jsonl.gz")
    assert [r["e_responses"] for r in rounds] == [6, 12]
    assert rounds[-1]["decision"] == "cap reached" and rounds[0]["decision"].startswith("grow")
    sweep = lines("eta_sweep.jsonl.gz")
    np.testing.assert_array_equal([r["eta"] for r in sweep], result.estimates.eta)
    np.testing.assert_array_equal(
        [r["truth"]["value"] for r in sweep], result.estimates.truth.value
    )
    e_seq = lines("e_sequences.jsonl.gz")
    assert len(e_seq) == result.e_responses == 12 and len(e_seq[0]["h_new"]) == 3
    tokens = lines("e_tokens.jsonl.gz")
    assert all(
        len(t["token_id"]) == len(t["d_entropy"]) == s["length"]
        for t, s in zip(tokens, e_seq, strict=True)
    )
    assert "entropy_at_lr" in tokens[0] and "entropy_at_lr" not in tokens[-1]  # first draws only
    texts = lines("texts.jsonl.gz")
    assert {t["batch"] for t in texts} == {"e", "u"} and all(
        isinstance(t["response"], str) for t in texts
    )
    with np.load(files["update_stats.npz"]) as npz:
        assert (
            npz["direction_norm"].shape
            == npz["denominator_min"].shape
            == (len(result.denominator),)
        )
    with np.load(files["kernel.npz"]) as npz:
        np.testing.assert_allclose(npz["blocks"].sum(0), npz["K"], rtol=1e-12, atol=1e-15)
    with gzip.open(files["checks.json.gz"], "rt") as f:
        assert json.load(f)["identity_relative_error"] < 1e-3


def names_of(*file_lists) -> set[str]:
    return set().union(*(n for files in file_lists for n in files.values()))


def test_detailed_logging_rotation_keeps_max_files(tmp_path, caplog):
    folder = tmp_path / "r.1"
    folder.mkdir()
    for i in range(5):  # an older run's files, oldest first
        old = folder / f"20260101T00000{i}.000Z.eta_sweep.jsonl"
        old.write_text("{}\n")
        os.utime(old, (1_000_000 + i, 1_000_000 + i))
    details = StageLog(folder, LoggingSettings(level="detailed", max_files=3))
    details.jsonl("eta_sweep.jsonl", [{"eta": 1.0}])
    details.json("update.json", {"lr": 1.0})
    with caplog.at_level(logging.INFO, logger="entroflow"):
        removed = details.finish()
    kept = sorted(p.name for p in folder.iterdir())
    assert len(kept) == 3 and set(details.written) <= set(folder.iterdir())
    assert "20260101T000004.000Z.eta_sweep.jsonl" in kept  # the newest older file stays
    assert [p.name for p in removed] == [
        f"20260101T00000{i}.000Z.eta_sweep.jsonl" for i in range(4)
    ]
    assert "removed 4 older files (max_files 3)" in caplog.text
    tight = StageLog(folder, LoggingSettings(level="detailed", max_files=1))
    tight.jsonl("a.jsonl", [{}])
    tight.jsonl("b.jsonl", [{}])
    tight.finish()  # never the run's own files
    assert {STAMP.sub("", p.name) for p in folder.iterdir()} == {"a.jsonl", "b.jsonl"}


def test_detailed_logging_settings_and_config(tmp_path, capsys):
    """Every logging key passes check-config and reaches the stage's params; the file records
    no logging key; a bad level is named."""
    from entroflow.cli import main

    keys = {
        "level": "debug",
        "log_sequences": False,
        "log_tokens": True,
        "log_raw_tensors": None,
        "compress": True,
        "max_files": 7,
    }
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    for stage in ("delta_h", "fisher"):
        config["runs"]["demo"][stage]["logging"] = dict(keys)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    assert main(["check-config", str(path)]) == 0
    entry = load_config(path)["runs"]["demo"]
    for stage, cls in (("delta_h", DeltaHSettings), ("fisher", FisherSettings)):
        params = stage_params(entry, stage)
        assert params[stage]["logging"] == keys
        settings = cls(**params[stage]).logging
        assert settings.switch("log_tokens") and not settings.switch("log_sequences")
        assert settings.switch("log_raw_tensors")  # None: the level's default (debug: on)
        assert "logging" not in recorded_settings(params)[stage]
    config["runs"]["demo"]["fisher"]["logging"]["level"] = "verbose"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    assert main(["check-config", str(path)]) == 1
    assert "runs.demo.fisher.logging.level" in capsys.readouterr().err
    assert LoggingSettings().switch("log_tokens") is False  # standard: every switch off
    with pytest.raises(ValueError, match="logging.level"):
        LoggingSettings(level="verbose")

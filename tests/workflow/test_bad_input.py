"""Bad input through the real workflow: each case fails with one readable message that names the
offending key, name or file, and leaves no output behind (not even a partial one)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from tests.conftest import save_tiny_model, tiny_config
from tests.workflow.test_workflow import ROOT, snakemake

SCORED = "results/x/shards/scored.0-of-1.h5"
GENERATED = "results/x/shards/generated.0-of-1.h5"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("bad-input") / "tiny-model", tiny_tokenizer, 1)


def base_config(model_dir: Path) -> dict:
    return tiny_config(
        model_dir, 4, {"x": {"sampling": {"max_new_tokens": 8, "samples_per_prompt": 1}}}
    )


def local_dataset(cfg, tmp, rows):
    path = tmp / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg["datasets"]["arith"] = {"source": "local", "path": str(path)}


def raw_dataset(cfg, tmp, data: bytes):
    path = tmp / "problems.jsonl"
    path.write_bytes(data)
    cfg["datasets"]["arith"] = {"source": "local", "path": str(path)}


def external_run_without_optimizer(cfg, tmp):
    folder = tmp / "ext/checkpoint-3"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    cfg["runs"] = {
        "ext": {
            "model": "tiny",
            "checkpoints": str(tmp / "ext/checkpoint-*"),
            "delta_h": {"enabled": True, "dataset": "arith"},
        }
    }
    return ["results/runs/ext/delta_h/checkpoint-3.h5"]


def set_key(keys, value):
    def mutate(cfg, tmp):
        node = cfg
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value(tmp) if callable(value) else value

    return mutate


def truncate_generated(work: Path) -> None:
    path = work / GENERATED
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class Case(NamedTuple):
    id: str
    mutate: Callable | str | None  # changes the config (may return targets), or the YAML text
    prepare: Callable | None  # damages a good tree before the failing run
    expected: list[str]  # what the error must say
    absent: tuple[str, ...] = ()  # outputs of the failed stage that must not exist


NO_PROBLEMS = ("resources/datasets/arith.parquet",)

CASES = [
    Case(
        "unknown-dataset",
        set_key(["experiments", "x", "dataset"], "hmmt"),
        None,
        ["experiments.x.dataset: unknown dataset 'hmmt'; available: arith"],
    ),
    Case(
        "unknown-model",
        set_key(["experiments", "x", "model"], "qwen"),
        None,
        ["experiments.x.model: unknown model 'qwen'; available: tiny"],
    ),
    Case(
        "unknown-experiment",
        lambda cfg, tmp: ["results/nope/entropy.h5"],
        None,
        ["results/nope/entropy.h5"],
    ),
    Case(
        "experiment-name-outside-results",
        lambda cfg, tmp: (
            cfg["experiments"].update({"../../x": cfg["experiments"].pop("x")})
            or ["results/../../x/entropy.h5"]
        ),
        None,
        ["config: experiments: bad name '../../x'"],
    ),
    Case(
        "dataset-name-with-regex-characters",
        lambda cfg, tmp: cfg["datasets"].update({"arith[1]": cfg["datasets"].pop("arith")}),
        None,
        ["config: datasets: bad name 'arith[1]'"],
    ),
    Case(
        "malformed-yaml",
        "experiments: {x: [unclosed\n",
        None,
        [
            "Config file is not valid JSON or YAML"
        ],  # Snakemake's words; `entroflow check-config` names the line
    ),
    Case(
        "wrong-type",
        set_key(["experiments", "x", "shards"], "two"),
        None,
        ["experiments.x.shards: 'two' is not of type 'integer'"],
    ),
    Case(
        "missing-model-path",
        set_key(["models", "tiny", "path"], lambda tmp: str(tmp / "no-such-model")),
        None,
        ["models.tiny: local model folder not found", "no-such-model"],
    ),
    Case(
        "unmapped-dataset-fields",
        lambda cfg, tmp: local_dataset(cfg, tmp, [{"question": "1+1", "solution": "2"}]),
        None,
        ["dataset 'arith': problem_field 'problem' is not a column; available: question, solution"],
        NO_PROBLEMS,
    ),
    Case(
        "empty-dataset",
        lambda cfg, tmp: local_dataset(cfg, tmp, []),
        None,
        ["dataset 'arith' is empty", "problems.jsonl"],
        NO_PROBLEMS,
    ),
    Case(
        "dataset-path-is-a-folder",
        set_key(["datasets", "arith"], lambda tmp: {"source": "local", "path": str(tmp)}),
        None,
        ["dataset 'arith':", "is a folder; give the data file itself"],
        NO_PROBLEMS,
    ),
    Case(
        "dataset-not-utf8",
        lambda cfg, tmp: raw_dataset(cfg, tmp, b'{"problem": "1+1", "answer": "2"}\n\xff\xfe\n'),
        None,
        ["problems.jsonl line 2: not UTF-8 text"],
        NO_PROBLEMS,
    ),
    Case(
        "dataset-line-not-json",
        lambda cfg, tmp: raw_dataset(cfg, tmp, b'{"problem": "1+1", "answer": "2"}\n{oops\n'),
        None,
        ["problems.jsonl line 2: not JSON"],
        NO_PROBLEMS,
    ),
    Case(
        "dataset-null-problem",
        lambda cfg, tmp: local_dataset(
            cfg, tmp, [{"problem": "1+1", "answer": "2"}, {"problem": None, "answer": "3"}]
        ),
        None,
        ["1 row(s) with a null or empty 'problem'", "the first is row 2"],
        NO_PROBLEMS,
    ),
    Case(
        "template-attribute-access",
        set_key(["datasets", "arith", "prompt_template"], "{problem.__class__}"),
        None,
        ["prompt_template may only use {problem}", "found {problem.__class__}"],
        NO_PROBLEMS,
    ),
    Case(
        "template-format-spec",
        set_key(["datasets", "arith", "prompt_template"], "{problem:>40}"),
        None,
        ["found {problem:>40}"],
        NO_PROBLEMS,
    ),
    Case(
        "prompt-over-context",
        set_key(["datasets", "arith", "prompt_template"], "{problem}" + " 7 +" * 200),
        None,
        ["at or over the model's context of 256"],
    ),
    Case(
        "checkpoint-without-optimizer",
        external_run_without_optimizer,
        None,
        ["checkpoint-3", "optimizer.pt"],
    ),
    Case(
        "truncated-hdf5",
        None,
        truncate_generated,
        ["generated.0-of-1.h5", "truncated"],
    ),
]


def files_under(work: Path) -> set[str]:
    """Result files, plus anything anywhere that looks like a partial or temporary output."""
    results = {str(p.relative_to(work)) for p in (work / "results").rglob("*")}
    leftovers = {
        str(p.relative_to(work))
        for p in work.rglob("*")
        if ".snakemake" not in p.parts and (".partial" in p.name or p.name.endswith(".tmp"))
    }
    return results | leftovers


@pytest.mark.workflow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_readably_and_leaves_nothing(tmp_path, tiny_model_dir, case):
    mutate, prepare = case.mutate, case.prepare
    cfg = copy.deepcopy(base_config(tiny_model_dir))
    work = tmp_path / "work"
    work.mkdir()
    config = tmp_path / "c.yaml"
    common = ("--configfile", str(config), "--directory", str(work))
    common += ("--snakefile", str(ROOT / "workflow/Snakefile"))
    if prepare is not None:  # a good tree first, then damage it
        config.write_text(yaml.safe_dump(cfg))
        good = snakemake(GENERATED, "--cores", "1", *common)
        assert good.returncode == 0, good.stderr[-3000:]
        prepare(work)
    targets = [SCORED]
    if isinstance(mutate, str):
        config.write_text(mutate)
    else:
        targets = (mutate(cfg, tmp_path) if mutate else None) or targets
        config.write_text(yaml.safe_dump(cfg))
    before = files_under(work)
    result = snakemake(*targets, "--cores", "1", *common)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    for text in case.expected:
        assert text in output, f"{text!r} not in:\n{output[-4000:]}"
    assert files_under(work) == before, "outputs left behind"
    for path in case.absent:
        assert not (work / path).exists(), path

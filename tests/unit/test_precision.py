"""Per-stage precision (lm.precision): torch's matmul precision set and restored, the entropy
accumulation dtype reaching the scorer, and every precision key accepted by the config."""

import pytest
import torch
import yaml

from entroflow.checkpoint.settings import DeltaHSettings, FisherSettings
from entroflow.config import ConfigError, schema_defaults, validate_config
from entroflow.lm.precision import Precision, PrecisionError, apply_precision
from entroflow.lm.scoring import batch_scores
from entroflow.training.monitor import EntropyMonitor
from tests.unit.test_config import RUN

EVERY_KEY = {
    "precision": {
        "dtype": "float32",
        "entropy_dtype": "float64",
        "tf32": True,
        "matmul_precision": "high",
    },
    "delta_h": {
        "enabled": True,
        "precision": {
            "dtype": "bfloat16",
            "entropy_dtype": "float32",
            "tf32": False,
            "matmul_precision": "highest",
        },
    },
    "fisher": {
        "enabled": True,
        "precision": {"dtype": "float64", "tf32": False, "matmul_precision": "medium"},
    },
    "lora": {"quantize": "nf4", "double_quant": False},
}


def test_precision_flags_are_set_and_restored():
    before = torch.get_float32_matmul_precision()
    with apply_precision({"tf32": True}) as p:
        assert torch.get_float32_matmul_precision() == "high" == p.matmul
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError), apply_precision({"matmul_precision": "medium"}):
        assert torch.get_float32_matmul_precision() == "medium"
        raise RuntimeError("the stage fails")
    assert torch.get_float32_matmul_precision() == before


def test_float64_entropy_accumulation_reaches_the_scorer(tiny_model):
    prompts, responses = [[5, 6, 7]], [[8, 9, 10, 11]]
    dtypes = {}
    for name in ("float32", "float64"):
        p = Precision.of({"entropy_dtype": name})
        h, lp = batch_scores(
            tiny_model, prompts, responses, pad_token_id=0, accum_dtype=p.entropy_torch_dtype
        )
        dtypes[name] = (h.dtype, lp.dtype, h)
    assert dtypes["float32"][:2] == (torch.float32, torch.float32)
    assert dtypes["float64"][:2] == (torch.float64, torch.float64)
    torch.testing.assert_close(dtypes["float64"][2].float(), dtypes["float32"][2])
    # training's trace scorer takes the run's entropy_dtype
    monitor = EntropyMonitor(tokenizer=None, accum_dtype=torch.float64)
    assert monitor.accum_dtype == torch.float64


@pytest.mark.parametrize("section", [(), ("delta_h",), ("fisher",)])
def test_precision_default_is_its_keys_defaults(section):
    """Each `precision` entry's default spells out its keys' defaults (settings read it whole)."""
    assert schema_defaults("runs", "*", *section)["precision"] == schema_defaults(
        "runs", "*", *section, "precision"
    )


def test_stage_settings_carry_precision_and_the_old_key():
    assert DeltaHSettings().accum_dtype == "float64" == DeltaHSettings().precision["entropy_dtype"]
    assert DeltaHSettings(precision={"entropy_dtype": "float32"}).accum_dtype == "float32"
    assert FisherSettings().precision["dtype"] == "float64"
    partial = FisherSettings(precision={"tf32": True}).precision
    assert partial == {"dtype": "float64", "tf32": True, "matmul_precision": None}
    p = Precision.of(FisherSettings().precision)
    assert p.load_dtype("auto") == "float32"  # loaded float32, then cast
    assert p.cast(torch.nn.Linear(2, 2)).weight.dtype == torch.float64
    assert Precision.of({}).load_dtype("bfloat16") == "bfloat16"  # null: the model's dtype


def test_every_precision_key_passes_check_config(tmp_path, capsys):
    from entroflow.cli import main

    path = tmp_path / "precision.yaml"
    path.write_text(yaml.safe_dump(RUN(**EVERY_KEY)))
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
    cfg = validate_config(RUN(**EVERY_KEY))["runs"]["r"]
    assert cfg["delta_h"]["precision"]["dtype"] == "bfloat16"
    assert cfg["precision"]["entropy_dtype"] == "float64"


def test_old_delta_h_keys_are_read_as_precision():
    run = validate_config(RUN(delta_h={"accum_dtype": "float32", "tf32": True}))["runs"]["r"]
    assert "accum_dtype" not in run["delta_h"] and "tf32" not in run["delta_h"]
    assert run["delta_h"]["precision"]["entropy_dtype"] == "float32"
    assert run["delta_h"]["precision"]["tf32"] is True


@pytest.mark.parametrize(
    "entry,message",
    [
        (
            {"delta_h": {"accum_dtype": "float32", "precision": {"entropy_dtype": "float64"}}},
            "runs.r.delta_h.accum_dtype: 'float32' contradicts delta_h.precision.entropy_dtype",
        ),
        (
            {"precision": {"tf32": True, "matmul_precision": "highest"}},
            "runs.r.precision.matmul_precision: 'highest' forbids the TF32 matmuls",
        ),
        ({"precision": {"entropy_dtype": "float16"}}, "runs.r.precision.entropy_dtype: 'float16'"),
        ({"fisher": {"precision": {"entropy_dtype": "float64"}}}, "runs.r.fisher.precision"),
        ({"precision": {"matmul_precision": "low"}}, "runs.r.precision.matmul_precision: 'low'"),
    ],
)
def test_bad_precision_names_the_key(entry, message):
    with pytest.raises(ConfigError) as err:
        validate_config(RUN(**entry))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_precision_error_outside_the_config_names_the_key():
    with pytest.raises(PrecisionError, match=r"^runs.x.precision.dtype: 'int8'"):
        Precision.of({"dtype": "int8"}, "runs.x.precision")


def test_maxent_weights_score_in_the_runs_entropy_dtype(tiny_tokenizer, tmp_path):
    """MaxEnt-GRPO's sequence log-probs (its weights' input) use precision.entropy_dtype."""
    from entroflow.data.datasets import load_problems
    from entroflow.training.run import prompts_dataset
    from entroflow.training.settings import RunSettings
    from entroflow.training.trainer import build_trainer
    from tests.conftest import make_tiny_model

    problems = prompts_dataset(load_problems("t", {"preset": "arithmetic", "n": 4, "seed": 1}))
    for name in ("float32", "float64"):
        settings = RunSettings(
            algorithm="maxent_grpo",
            group_size=2,
            prompts_per_step=1,
            precision={"entropy_dtype": name},
        )
        trainer = build_trainer(
            settings,
            make_tiny_model(tiny_tokenizer),
            tiny_tokenizer,
            problems,
            str(tmp_path / name),
            reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        )
        assert trainer.accum_dtype == getattr(torch, name)

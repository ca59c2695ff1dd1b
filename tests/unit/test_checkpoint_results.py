"""Stage settings take their defaults from the schema; the checkpoint stages' results survive
their files (write, read)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from entroflow.checkpoint.delta_h_result import SWEEP_KEYS, DeltaHResult, Estimates, Interval
from entroflow.checkpoint.fisher_run import KERNEL_ARRAYS, FisherResult
from entroflow.checkpoint.settings import DeltaHSettings, FisherSettings, RunShape, stage_params
from entroflow.config import load_config, schema_defaults

WORKFLOW_ONLY = {"delta_h": {"enabled", "dataset"}, "fisher": {"enabled", "keep_gradients"}}


@pytest.mark.parametrize(
    ("stage", "settings_class"), [("delta_h", DeltaHSettings), ("fisher", FisherSettings)]
)
def test_stage_settings_defaults_are_the_schemas(stage, settings_class):
    schema = schema_defaults("runs", "*", stage)
    keys = set(schema) - WORKFLOW_ONLY[stage]
    fields = {f.name for f in dataclasses.fields(settings_class)}
    assert keys <= fields, keys - fields  # a schema key the stage would not accept
    defaults = dataclasses.asdict(settings_class())
    schema["logging"] = schema_defaults("runs", "*", stage, "logging")  # a section's own defaults
    assert {k: defaults[k] for k in keys} == {k: schema[k] for k in keys}


def test_training_and_analysis_settings_defaults_are_the_schemas():
    from entroflow.tokens.analysis import AnalysisSettings
    from entroflow.training.settings import RunSettings

    run, lora = schema_defaults("runs", "*"), schema_defaults("runs", "*", "lora")
    settings = dataclasses.asdict(RunSettings())
    for key, value in settings.items():
        want = lora[key.removeprefix("lora_")] if key.startswith("lora_") else run[key]
        assert value == want, key
    analysis = schema_defaults("analysis")
    assert all(v == analysis[k] for k, v in dataclasses.asdict(AnalysisSettings()).items())


def test_stage_params_keep_only_what_the_stage_uses():
    config = load_config("config/config.yaml")
    entry = config["runs"]["demo"]
    params = stage_params(entry, "delta_h")
    assert set(params) == {"run", "delta_h"}
    RunShape(**params["run"])  # every RunShape field the run entry has, nothing else
    DeltaHSettings(**params["delta_h"])
    assert "maxent" not in params["run"] and entry["algorithm"] != "maxent_grpo"
    assert params["delta_h"]["e_prompts"] == entry["delta_h"]["e_prompts"]
    FisherSettings(**stage_params(entry, "fisher")["fisher"])


def _interval(value, half=None):
    value = np.asarray(value, dtype=float)
    half = 0.2 * np.abs(value) if half is None else np.broadcast_to(half, value.shape) * 1.0
    return Interval(value, np.stack([value - half, value + half], axis=1), half / 1.96)


def delta_h_result(lr: float, verdict: str = "confirmed") -> DeltaHResult:
    """A ΔH result on a 4-point η grid, without batches."""
    values = np.array([1.0, 2.0, 3.0, 4.0])
    est = Estimates(
        eta=np.array([0.25, 0.5, 1, 2]) * lr,
        truth=_interval(values, [0.2, 0.4, 0.6, 0.8]),
        truth_sym=_interval(values),
        snis=_interval(values),
        snis_minus=_interval(-values),
        first_order=_interval(values + 0.1),
        first_order_gradient_part=_interval(values),
        first_order_remainder=_interval(values / 10),
        covariance=Interval(values / 100, np.full((4, 2), np.nan), np.full(4, np.nan)),
        nonlinearity=_interval([0.0, 0.01, 0.02, 0.04], 0.1),
        relative_error=np.array([0.0, 0.005, 0.007, 0.01]),
        relative_error_ci=np.array([[np.nan, np.nan]] * 2 + [[-0.1, 0.1]] * 2),
        verdict=np.array([verdict] * 4, dtype=object),
        ess=np.full(4, 10.0),
        ess_minus=np.full(4, 10.0),
        clip_fraction=np.zeros(4),
        clip_fraction_minus=np.zeros(4),
    )
    scalars = dict.fromkeys(
        ("adam_gradient_factor", "entropy", "slope_total", "slope_gradient_part"), 0.5
    )
    return DeltaHResult(
        estimates=est,
        sweep={k: np.zeros((4, 2)) for k in SWEEP_KEYS},
        e_batch=None,
        u_batch=None,
        denominator={"w": np.ones(3, dtype=np.float32)},
        lr=lr,
        **scalars,
        slope_remainder=0.0,
        loglog_slope=0.98,
        loglog_r2=0.99,
        verdict_at_lr=verdict,
        ground_truth_method="test",
        forward_equivalents=20.0,
        e_responses=4096,
        e_prompts=2048,
        e_samples_per_prompt=2,
        relative_half_width_at_lr=0.2,
        u_responses_kept=8,
        u_responses=16,
        seconds=1.0,
    )


def test_delta_h_result_round_trip(tmp_path):
    result = delta_h_result(1e-3)
    result.step, result.settings = 20, {"delta_h": {"seed": 3}}
    result.write(tmp_path / "d.h5")
    back = DeltaHResult.read(tmp_path / "d.h5")
    for f in dataclasses.fields(Estimates):
        want, got = getattr(result.estimates, f.name), getattr(back.estimates, f.name)
        if isinstance(want, Interval):
            for part in ("value", "ci", "stderr"):
                np.testing.assert_array_equal(getattr(got, part), getattr(want, part))
        else:
            assert np.array_equal(got, want, equal_nan=want.dtype != object), f.name
    skip = {"estimates", "sweep", "denominator", "e_batch", "u_batch"}
    for f in dataclasses.fields(DeltaHResult):
        if f.name not in skip:
            assert getattr(back, f.name) == getattr(result, f.name), f.name
    np.testing.assert_array_equal(back.denominator["w"], result.denominator["w"])
    assert back.e_batch is None and back.at_lr == 2
    assert DeltaHResult.read(tmp_path / "d.h5", batches=False).denominator == {}


def test_fisher_result_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {name: rng.normal(size=(3, 2)) for name in KERNEL_ARRAYS}
    result = FisherResult(
        **arrays,
        identity_from_kernel=1.0,
        identity_from_delta_h=1.0 + 1e-9,
        identity_relative_error=1e-9,
        sketch_dim=0,
        sketch_relative_error=float("nan"),
        parameters=6,
        gradient_seconds=1.0,
        kernel_seconds=0.5,
        sequences_per_second=5.0,
        step=10,
    )
    result.write(tmp_path / "k.h5")
    back = FisherResult.read(tmp_path / "k.h5")
    for name in KERNEL_ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), arrays[name])
    assert back.step == 10 and back.identity_relative_error == 1e-9
    assert np.isnan(back.sketch_relative_error)


def test_a_delta_h_file_from_an_older_entroflow_is_named(tmp_path):
    """Files made before the Fisher stage read the update from them lack its attributes."""
    import h5py

    from entroflow.io import ContractError

    delta_h_result(1e-3).write(tmp_path / "d.h5")
    with h5py.File(tmp_path / "d.h5", "a") as f:
        del f.attrs["adam_gradient_factor"]
    with pytest.raises(ContractError, match="older entroflow .*adam_gradient_factor.*forcerun"):
        DeltaHResult.read(tmp_path / "d.h5")

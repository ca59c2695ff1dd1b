"""What the ΔH stage finds for one checkpoint, and its file delta_h/checkpoint-{step}.h5.

`DeltaHResult.write` / `read` are the only places the file's names are spelled; plots, the
summary, the Fisher stage, benchmarks and tests read the fields. Layout:
  /<estimate>, /<estimate>_ci, /<estimate>_stderr   (η,), (η, 2), (η,) for each `Interval` field
  /eta, /relative_error(_ci), /verdict, /ess(_minus), /clip_fraction(_minus)   over η
  /log_ratio(_minus), /h_new(_minus)                 (η, N first draws): the sweep, for re-analysis
  /e_batch/, /u_batch/                               token tables in the contract layout
  /update/denominator/<parameter>                    Adam's D = √v̂ + ε of the replayed step
  attributes                                         the scalar fields below
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from entroflow.io import ContractError, TokenTable, read_token_file, write_token_file

SWEEP_KEYS = ("log_ratio", "h_new", "log_ratio_minus", "h_new_minus")
UPDATE_GROUP = "update/denominator"


@dataclass
class Interval:
    """One estimate over the η grid with its 95% interval (bootstrap over E prompts)."""

    value: np.ndarray  # (η,)
    ci: np.ndarray  # (η, 2)
    stderr: np.ndarray  # (η,)

    def at(self, i: int) -> tuple[float, float, float]:
        """(value, lo, hi) at η index i."""
        return float(self.value[i]), float(self.ci[i, 0]), float(self.ci[i, 1])


# Estimates field -> its name in the file (legacy names kept: files written before still read).
INTERVAL_NAMES = {
    "truth": "delta_h_true",  # ground truth: η·slope (all responses) + R(η) (first draws)
    "truth_sym": "delta_h_true_sym",  # (ΔH(η) - ΔH(-η)) / 2
    "snis": "delta_h_snis",  # plain SNIS baseline at θ + ηv
    "snis_minus": "delta_h_snis_minus",  # ... at θ - ηv
    "first_order": "delta_h_first_order",  # δH₁ = η⟨∇H, v⟩
    "first_order_gradient_part": "delta_h_first_order_gradient_part",
    "first_order_remainder": "delta_h_first_order_remainder",  # momentum + weight decay
    "covariance": "delta_h_cov",  # the covariance predictor (Cui et al. 2025)
    "nonlinearity": "nonlinearity",  # R(η) = ΔH - δH₁
}
ARRAY_NAMES = (
    "eta",
    "relative_error",
    "relative_error_ci",
    "verdict",
    "ess",
    "ess_minus",
    "clip_fraction",
    "clip_fraction_minus",
)


@dataclass
class Estimates:
    """Every estimate of the stage over the η grid."""

    eta: np.ndarray  # (η,) absolute step sizes
    truth: Interval
    truth_sym: Interval
    snis: Interval
    snis_minus: Interval
    first_order: Interval
    first_order_gradient_part: Interval
    first_order_remainder: Interval
    covariance: Interval
    nonlinearity: Interval
    relative_error: np.ndarray  # (η,) δH₁'s relative error -R / ΔH
    relative_error_ci: np.ndarray  # (η, 2) Fieller's set (NaN where unbounded)
    verdict: np.ndarray  # (η,) confirmed | rejected | undecided
    ess: np.ndarray  # (η,) effective sample size of the SNIS weights at θ + ηv
    ess_minus: np.ndarray
    clip_fraction: np.ndarray
    clip_fraction_minus: np.ndarray

    def datasets(self) -> dict[str, np.ndarray]:
        out = {name: getattr(self, name) for name in ARRAY_NAMES}
        for attr, name in INTERVAL_NAMES.items():
            interval = getattr(self, attr)
            out[name], out[name + "_ci"], out[name + "_stderr"] = (
                interval.value,
                interval.ci,
                interval.stderr,
            )
        # Derived, for readers of the file alone.
        out["stderr"] = self.truth.stderr
        out["delta_h_true_minus"] = self.truth.value - 2 * self.truth_sym.value
        return out

    @classmethod
    def from_datasets(cls, d: dict[str, np.ndarray]) -> Estimates:
        intervals = {
            attr: Interval(d[name], d[name + "_ci"], d[name + "_stderr"])
            for attr, name in INTERVAL_NAMES.items()
        }
        arrays = {name: d[name] for name in ARRAY_NAMES}
        arrays["verdict"] = np.asarray(arrays["verdict"], dtype=object)
        return cls(**intervals, **arrays)


@dataclass
class DeltaHResult:
    """The ΔH stage's output for one checkpoint (see the module docstring for the file)."""

    estimates: Estimates
    sweep: dict[str, np.ndarray]  # SWEEP_KEYS -> (η, N first draws)
    e_batch: TokenTable | None  # None when read without the batches
    u_batch: TokenTable | None
    denominator: dict[str, np.ndarray]  # parameter -> Adam's D of the replayed step ({} unread)
    lr: float
    adam_gradient_factor: float  # (1 - β1) / (1 - β1^t'): the gradient's weight in the step
    entropy: float  # H at θ on the first draws, in the stage's normalisation
    slope_total: float  # ⟨∇H, v⟩ per unit η
    slope_gradient_part: float
    slope_remainder: float
    loglog_slope: float
    loglog_r2: float
    verdict_at_lr: str
    ground_truth_method: str
    forward_equivalents: float  # cost over the first draws, in plain forward passes
    e_responses: int
    e_prompts: int
    e_samples_per_prompt: int
    relative_half_width_at_lr: float
    u_responses_kept: int
    u_responses: int
    seconds: float
    checkpoint: str = ""
    step: int = -1
    settings: dict = field(default_factory=dict)

    @property
    def at_lr(self) -> int:
        """Index of η = lr (the step training takes) in the η grid."""
        return index_at_lr(self.estimates.eta, self.lr)

    def attributes(self) -> dict:
        return file_attributes(self, BATCH_FIELDS)

    def write(self, path: str | Path) -> None:
        groups = {"": {**self.estimates.datasets(), **self.sweep}}
        for name, table in (("e_batch", self.e_batch), ("u_batch", self.u_batch)):
            if table is not None:
                groups.update({f"{name}/{g}": d for g, d in table.groups.items()})
        groups[UPDATE_GROUP] = self.denominator
        write_token_file(path, TokenTable(groups=groups, attrs=self.attributes()))

    @classmethod
    def read(cls, path: str | Path, batches: bool = True) -> DeltaHResult:
        """The file at `path`; `batches=False` skips the E/U tables and the update (fast)."""
        root = read_token_file(path, groups=[""])
        d, scalars = root.groups[""], fields_from_attributes(cls, root.attrs)
        with h5py.File(path, "r") as f:
            groups = set(f)
        missing = sorted(REQUIRED_ATTRIBUTES - set(scalars))
        if missing or UPDATE_GROUP.split("/")[0] not in groups:
            raise ContractError(
                f"{path}: written by an older entroflow (no {', '.join(missing) or 'update'}); "
                "make it again: snakemake --forcerun estimate_delta_h (see README, What reruns when)"
            )

        def group(root: str, **kw) -> TokenTable | None:
            present = root.split("/")[0] in groups
            return read_token_file(path, root=root, **kw) if batches and present else None

        update = group(UPDATE_GROUP, groups=[""])
        return cls(
            estimates=Estimates.from_datasets(d),
            sweep={k: d[k] for k in SWEEP_KEYS},
            e_batch=group("e_batch"),
            u_batch=group("u_batch"),
            denominator=update.groups.get("", {}) if update else {},
            **scalars,
        )


def index_at_lr(eta: np.ndarray, lr: float) -> int:
    """Index of the η grid's step closest to η = lr."""
    return int(np.argmin(np.abs(np.asarray(eta) / lr - 1.0)))


def file_attributes(result, skip: set[str]) -> dict:
    """A result's scalar fields as file attributes (settings as JSON); `skip`: its array fields."""
    out = {
        f.name: getattr(result, f.name)
        for f in dataclasses.fields(result)
        if f.name not in skip | {"settings"}
    }
    return {**out, "settings": json.dumps(result.settings)}


def fields_from_attributes(cls, attrs: dict) -> dict:
    """The result class's scalar fields found among a file's attributes (settings parsed)."""
    names = {f.name for f in dataclasses.fields(cls)}
    scalars = {k: v for k, v in attrs.items() if k in names}
    return {**scalars, "settings": json.loads(scalars.get("settings") or "{}")}


BATCH_FIELDS = {"estimates", "sweep", "e_batch", "u_batch", "denominator"}
REQUIRED_ATTRIBUTES = {  # the scalar fields without a default: a file must have them all
    f.name
    for f in dataclasses.fields(DeltaHResult)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
} - BATCH_FIELDS

"""Numeric precision of one stage: the model's runtime dtype, the dtype entropies are accumulated
in, and torch's float32 matmul precision (TF32), set for the stage and restored after it.

One `precision:` entry per stage in the config (`runs.<run>.precision` for training,
`runs.<run>.delta_h.precision`, `runs.<run>.fisher.precision`; defaults in the schema):

- `dtype`: the model's weights and activations (null: the model entry's `dtype`; the Fisher stage
  defaults to float64, its kernel identity is checked to ~1e-6);
- `entropy_dtype`: accumulation of entropies and log-probs (the scorer's `accum_dtype`);
  `delta_h.accum_dtype` is its older name;
- `tf32` and `matmul_precision`: `torch.set_float32_matmul_precision` (highest: full float32;
  high: TF32 on CUDA; medium: bfloat16 passes). `tf32: true` is `matmul_precision: high`;
  `delta_h.tf32` is its older spelling. Only this torch API is used: mixing it with the legacy
  `torch.backends.cuda.matmul.allow_tf32` setter makes torch refuse to report the precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from entroflow.errors import EntroflowError
from entroflow.lm.models import DTYPES

RUNTIME_DTYPES = (*DTYPES, "float64")
ENTROPY_DTYPES = ("float32", "float64")
MATMUL_PRECISIONS = ("highest", "high", "medium")


class PrecisionError(EntroflowError):
    """A precision setting is not one torch can take; the message names the key."""


@dataclass(frozen=True)
class Precision:
    dtype: str | None = None  # None: the model entry's dtype
    entropy_dtype: str = "float32"
    tf32: bool = False
    matmul_precision: str | None = None  # None: "high" with tf32, else "highest"

    @classmethod
    def of(cls, settings: Precision | Mapping | None, where: str = "precision") -> Precision:
        """Checked settings from a config entry (`where` names it in errors)."""
        if isinstance(settings, Precision):
            return settings
        settings = dict(settings or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise PrecisionError(
                f"{where}.{unknown[0]}: not a precision key; available: {', '.join(sorted(names))}"
            )
        p = cls(**settings)
        for key, value, allowed in (
            ("dtype", p.dtype, (None, *RUNTIME_DTYPES)),
            ("entropy_dtype", p.entropy_dtype, ENTROPY_DTYPES),
            ("matmul_precision", p.matmul_precision, (None, *MATMUL_PRECISIONS)),
        ):
            if value not in allowed:
                raise PrecisionError(
                    f"{where}.{key}: '{value}' is not one of "
                    f"{', '.join(str(a) for a in allowed if a is not None)}"
                )
        if not isinstance(p.tf32, bool):
            raise PrecisionError(f"{where}.tf32: expected true or false, got {p.tf32!r}")
        if p.tf32 and p.matmul_precision == "highest":
            raise PrecisionError(
                f"{where}.matmul_precision: 'highest' forbids the TF32 matmuls tf32: true allows"
            )
        return p

    @property
    def matmul(self) -> str:
        """The float32 matmul precision the stage runs at."""
        return self.matmul_precision or ("high" if self.tf32 else "highest")

    @property
    def entropy_torch_dtype(self):
        import torch

        return getattr(torch, self.entropy_dtype)

    def load_dtype(self, model_dtype: str) -> str:
        """The dtype to load the model in (float64 is loaded as float32, then cast: see `cast`)."""
        dtype = self.dtype or model_dtype
        return "float32" if dtype == "float64" else dtype

    def cast(self, model):
        """The loaded model at the runtime dtype (only float64 needs a cast after loading)."""
        return model.double() if self.dtype == "float64" else model


@contextmanager
def apply_precision(
    settings: Precision | Mapping | None, where: str = "precision"
) -> Iterator[Precision]:
    """Run a stage under `settings`: torch's float32 matmul precision set on entry, the previous
    one restored on exit (also on error). Yields the checked `Precision` (its dtypes are for the
    caller: `load_dtype`/`cast` for the model, `entropy_torch_dtype` for the scorer)."""
    import torch

    precision = Precision.of(settings, where)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision.matmul)
    try:
        yield precision
    finally:
        torch.set_float32_matmul_precision(saved)

"""Checkpoints in the Hugging Face Trainer layout: the policy, and AdamW state by parameter name."""

from __future__ import annotations

import json
import re
from pathlib import Path

from entroflow.errors import EntroflowError
from entroflow.lm.models import load_model
from entroflow.lm.precision import Precision

STEP = re.compile(r"checkpoint-(\d+)$")
# Written next to optimizer.pt by entroflow's trainer: the parameter names in the optimizer's order.
PARAM_NAMES_FILE = "optimizer_param_names.json"


class CheckpointError(EntroflowError):
    """A checkpoint folder lacks something an analysis needs; the message names the folder."""


def checkpoint_step(path: str | Path) -> int:
    match = STEP.search(str(Path(path)).rstrip("/"))
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint-<step> folder")
    return int(match[1])


def find_checkpoints(pattern: str) -> dict[int, str]:
    """step -> folder for every checkpoint-<step> folder matching a glob (external runs)."""
    from glob import glob

    found = {checkpoint_step(p): p for p in sorted(glob(pattern)) if STEP.search(p.rstrip("/"))}
    return dict(sorted(found.items()))


def require_optimizer_state(folder: str | Path) -> None:
    folder = Path(folder)
    missing = [f for f in ("optimizer.pt", PARAM_NAMES_FILE) if not (folder / f).exists()]
    if missing:
        raise CheckpointError(
            f"{folder}: no {' or '.join(missing)}; the per-checkpoint analyses (ΔH, Fisher kernel) need "
            "the AdamW state and the parameter names in optimizer order (entroflow's trainer writes both)"
        )


def load_adam_state(folder: str | Path) -> dict[str, dict]:
    """name -> {exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay} from optimizer.pt."""
    import torch

    require_optimizer_state(folder)
    folder = Path(folder)
    try:
        names = json.loads((folder / PARAM_NAMES_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{folder / PARAM_NAMES_FILE}: unreadable ({err}); this checkpoint cannot be used "
            "for ΔH or the Fisher kernel"
        ) from None
    try:
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle error, a non-tensor payload, ...
        raise CheckpointError(
            f"{folder / 'optimizer.pt'}: unreadable as AdamW state ({_load_failure(err)}); this "
            "checkpoint cannot be used for ΔH or the Fisher kernel (rewrite it, or leave it out)"
        ) from None
    out = {}
    for group, group_names in zip(state["param_groups"], names, strict=True):
        if len(group["params"]) != len(group_names):
            raise CheckpointError(
                f"{folder}: optimizer group sizes do not match {PARAM_NAMES_FILE}"
            )
        hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
        for index, name in zip(group["params"], group_names, strict=True):
            out[name] = {**state["state"].get(index, {}), **hyper}
    return out


def _load_failure(err: Exception) -> str:
    """Why torch.load failed, in our words. torch's own message advises retrying with
    weights_only=False, which would run the file's pickle code: it never reaches the user."""
    text = str(err).lower()
    if "weights only" in text or "unpickl" in text:
        return "damaged, or it holds objects other than tensors, which are not unpickled (that could run code)"
    if "zip" in text or "eof" in text or isinstance(err, EOFError):
        return "not a complete torch file: truncated or damaged"
    return type(err).__name__


def load_policy(
    base_model: str,
    checkpoint: str | Path,
    dtype: str = "auto",
    merge: bool = True,
    quantize: str | None = None,
    double_quant: bool = True,
):
    """Base model + the checkpoint's LoRA adapter (merged for fast sampling unless merge=False).

    A QLoRA run's checkpoint (`quantize` nf4 | fp4, as it was trained) gets its base quantized the
    same way and then de-quantized (`models.dequantize_4bit`): the weights the trained model
    multiplied by, in plain layers, so ΔH and the Fisher kernel measure the model that was trained
    with forward-mode tangents and in float64, which bitsandbytes' 4-bit layers do not support."""
    from peft import PeftModel

    folder = Path(checkpoint)
    if not (folder / "adapter_config.json").exists():
        raise CheckpointError(f"{folder}: no adapter_config.json (expected a PEFT LoRA checkpoint)")
    base = load_model(
        base_model, dtype=dtype, quantize=quantize, double_quant=double_quant, dequantize=True
    )
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=not merge)
    return model.merge_and_unload().eval() if merge else model


def load_stage_policy(
    base_model: str, checkpoint: str | Path, model_entry: dict, precision: Precision
):
    """The policy a per-checkpoint stage (ΔH, Fisher) measures: the adapter unmerged on the base
    loaded as the model entry says (its dtype unless the stage's precision sets one; a QLoRA
    base quantized and de-quantized as trained), then cast to the stage's precision dtype."""
    model = load_policy(
        base_model,
        checkpoint,
        dtype=precision.load_dtype(model_entry["dtype"]),
        merge=False,
        quantize=model_entry.get("quantize"),
        double_quant=model_entry.get("double_quant", True),
    )
    return precision.cast(model)

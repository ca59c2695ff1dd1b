"""Adam-preconditioned Fisher kernel K₁(t, t') = Σ_α ∂_α S(t) P_α ∂_α S(t') between sequences.

Per-sequence gradients of S(y) = Σ_t log π(y_t) come from one batched backward: forward hooks on
the LoRA Linear layers (PEFT's lora_A / lora_B) keep each layer's input a (B, T, in) and output,
the backward asks autograd for the outputs' gradients e (B, T, out) only (no weight gradient, no
backward hook), and sequence b's weight gradient is Σ_t e[b,t] ⊗ a[b,t], exactly, because
sequences in a batch do not interact and padding carries no gradient. Gradients are
scaled once by √P (P = 1/D from the replayed AdamW step), so K = G_E G_Uᵀ, accumulated over
parameter blocks without ever holding all gradients at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from entroflow.lm.batching import pair_batches
from entroflow.lm.scoring import batch_scores, unwrap_peft


def lora_linears(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """{weight name: its bias-free Linear module} for named Linear weights (PEFT's lora_A / lora_B)."""
    modules = dict(unwrap_peft(model).named_modules())
    params = dict(model.named_parameters())
    targets = {}
    for name in names:
        module_name = name.rsplit(".", 1)[0]
        module = modules.get(module_name.removeprefix("base_model.model."))
        if (
            not isinstance(module, torch.nn.Linear)
            or module.bias is not None
            or not name.endswith(".weight")
        ):
            raise ValueError(f"per-sample hooks need bias-free Linear weights; {name} is not one")
        if module.weight is not params[name]:
            raise ValueError(f"{name} does not belong to module {module_name}")
        targets[name] = module
    return targets


class LayerCapture:
    """Forward hooks that keep each target Linear's input (optionally transformed on the spot, e.g.
    projected) and its output tensor; `output_grads(loss)` then returns ∂loss/∂output per layer
    from one backward that asks autograd for those tensors only, so no weight gradient (and no
    backward hook) is ever computed."""

    def __init__(self, targets: dict[str, torch.nn.Module], transform=None):
        self.targets = targets
        self.transform = transform  # (name, input) -> what to keep
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_hook(self._save(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _save(self, name):
        def hook(module, args, output):
            if not output.requires_grad:  # e.g. the scorer's once-per-model no-grad head check
                return
            if name in self.outputs:
                raise ValueError(f"{name} ran twice in one forward; per-sample hooks need once")
            x = args[0].detach()
            self.inputs[name] = x if self.transform is None else self.transform(name, x)
            self.outputs[name] = output

        return hook

    def output_grads(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        names = list(self.outputs)
        grads = torch.autograd.grad(
            loss, [self.outputs[n] for n in names], allow_unused=True, materialize_grads=True
        )
        self.outputs.clear()
        return dict(zip(names, grads, strict=True))


def captured_batches(
    model,
    targets: dict[str, torch.nn.Module],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    temperature: float,
    max_tokens_per_batch: int = 4096,
    accum_dtype: torch.dtype = torch.float64,
    transform=None,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Yields (sequence indices, {layer: kept input}, {layer: ∂ΣS/∂output}) batch by batch: one
    forward and one backward per batch, the inputs kept through `LayerCapture(transform)`."""
    for batch in pair_batches(prompts, responses, max_tokens_per_batch):
        with LayerCapture(targets, transform=transform) as capture:
            # One forward in exactly this order: the hooks' batch rows are these sequences.
            _, logprob = batch_scores(
                model,
                [prompts[i] for i in batch],
                [responses[i] for i in batch],
                pad_token_id=pad_token_id,
                temperature=temperature,
                accum_dtype=accum_dtype,
            )
            out_grads = capture.output_grads(logprob.sum())
        yield batch, capture.inputs, out_grads


def sequence_gradients(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    names: Sequence[str],
    *,
    pad_token_id: int,
    temperature: float,
    max_tokens_per_batch: int = 4096,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yields (sequence indices, {name: (b, *shape) ∇S per sequence}) batch by batch."""
    targets = lora_linears(model, names)
    for batch, inputs, out_grads in captured_batches(
        model,
        targets,
        prompts,
        responses,
        pad_token_id=pad_token_id,
        temperature=temperature,
        max_tokens_per_batch=max_tokens_per_batch,
    ):
        grads = {}
        for name in names:
            a, e = inputs.pop(name), out_grads.pop(name).detach()
            # (B, T, out) x (B, T, in) -> (B, out, in) in the activations' dtype, at least float32
            # (autograd's own weight gradient has that precision; the Fisher stage runs in
            # float64 by default), returned in float64
            dtype = torch.promote_types(a.dtype, torch.float32)
            grads[name] = torch.einsum("bto,bti->boi", e.to(dtype), a.to(dtype)).double()
        yield batch, grads


def flatten_blocks(
    grads: dict[str, torch.Tensor], names: Sequence[str], scale: dict[str, torch.Tensor]
) -> torch.Tensor:
    """(b, Σ|α|) rows of √P ⊙ ∇S, parameters concatenated in `names` order."""
    return torch.cat(
        [
            (grads[n] * scale[n].to(grads[n].device, torch.float64)).reshape(grads[n].shape[0], -1)
            for n in names
        ],
        dim=1,
    )


def kernel_blocked(
    g_e: np.ndarray | torch.Tensor, g_u: np.ndarray | torch.Tensor, block: int
) -> torch.Tensor:
    """K = G_E G_Uᵀ accumulated over parameter blocks of `block` columns (bounded peak memory)."""
    g_e, g_u = torch.as_tensor(g_e), torch.as_tensor(g_u)
    k = torch.zeros(g_e.shape[0], g_u.shape[0], dtype=torch.float64)
    for start in range(0, g_e.shape[1], block):
        k += g_e[:, start : start + block].double() @ g_u[:, start : start + block].double().T
    return k


def jl_sketch(
    rows: torch.Tensor, k: int, seed: int, start_column: int = 0, total_columns: int | None = None
) -> torch.Tensor:
    """Project rows (b, d_block) with a seeded Gaussian matrix (d, k) / √k, one column block at a time.

    The same seed and `start_column` regenerate the same block of the projection, so a stream of
    parameter blocks sketches to the same result as the whole matrix.
    """
    g = torch.Generator().manual_seed(seed + 1_000_003 * start_column)
    proj = torch.randn(rows.shape[1], k, generator=g, dtype=torch.float64) / np.sqrt(k)
    return rows.double() @ proj.to(rows.device)  # drawn on the CPU: the same matrix anywhere


def kernel_delta_h(
    kernel: torch.Tensor, s_eval: np.ndarray, coefficients: np.ndarray, adam_factor: float
) -> tuple[float, np.ndarray]:
    """The gradient part of δH₁/η for the surprisal estimator from K, split per training sequence.

    With the RL loss L = -Σ_i c_i S_i (c_i = A_i / (B·L_max) for Dr.GRPO, A_i / (B·L_i) for GRPO),
    δH₁/η = -adam_factor · (1/N_E) Σ_t (S_t - b_t) Σ_i K(t, i) c_i, b_t the leave-one-out mean of S
    (the first-order estimator's baseline) and adam_factor = (1 - β1) / (1 - β1^t').
    """
    n = len(s_eval)
    centred = s_eval - (s_eval.sum() - s_eval) / max(n - 1, 1)
    contributions = -adam_factor * (centred @ kernel.numpy()) * coefficients / n  # (N_U,)
    return float(contributions.sum()), contributions

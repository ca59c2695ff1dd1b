"""A factored sketch of the Adam-preconditioned Fisher kernel for many sequences (LoGra-style).

For a bias-free Linear W (out x in) with input x_t and output gradient δ_t, sequence b's gradient
is G_b = Σ_t δ_t x_tᵀ. Its sketch projects both factors with small seeded Gaussian matrices
before their outer product,

    Ĝ_b = R_out (√P ⊙ G_b) R_inᵀ ≈ Σ_t (R_out (a ⊙ δ_t)) (R_in (b ⊙ x_t))ᵀ   (k_out x k_in),

so a sequence costs k = Σ_layers k_out·k_in numbers and no (out x in) gradient is formed. A side
no longer than its k (LoRA's rank side) is kept exactly (R = identity), and then
⟨Ĝ, Ĝ'⟩ is an unbiased estimate of ⟨√P⊙G, √P⊙G'⟩ with a JL-like error that falls as 1/√k.

Adam's √P = D^(-1/2) (elementwise) does not factor. Two ways to handle it:

- `preconditioner="factored"`: √P ≈ Σ_{j<ρ} a_j b_jᵀ, its best rank-ρ approximation (SVD), folded
  into δ and x before projecting (ρ times the projection work). Adam's second moment is nearly
  rank one for a matrix weight (Adafactor's premise), so ρ = 1 is close; `preconditioner_error`
  measures how close, and the kernel's error includes it.
- `preconditioner="exact"`: form each layer's per-sequence gradients for one batch (the einsum
  that replaces the weight gradient of a plain backward), scale by √P ⊙ S, then project; exact in
  P, transient memory one layer's (batch x out x in), never a whole row. S is a seeded ±1 matrix:
  ⟨S⊙A, S⊙B⟩ = ⟨A, B⟩, so it changes nothing in expectation, but it gives each row of LoRA's
  narrow (unprojected) side its own projection R·diag(s_i), which removes the correlation between
  rows that a shared R keeps (a per-sequence LoRA gradient has rank ≤ min(T, r)): the error
  becomes that of a JL sketch of the layer's whole block, not of k_in numbers.

The exact blocked kernel (`fisher.kernel_blocked`) stays the reference for small sets.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from entroflow.estimators.fisher import captured_batches, lora_linears

PRECONDITIONERS = ("factored", "exact", "none")


def projection(dim: int, k: int, seed: int, name: str) -> torch.Tensor | None:
    """Seeded Gaussian (k, dim) / √k, or None (identity) when k == 0 or k >= dim.

    Depends only on (seed, name, dim, k), so E and U sequences (and reruns) share it.
    """
    if k <= 0 or k >= dim:
        return None
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(k, dim, generator=g, dtype=torch.float64) / np.sqrt(k)


def signs(shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    """Seeded ±1 of `shape` (float64), depending only on (seed, name, shape)."""
    g = torch.Generator().manual_seed((seed * 999_983 + zlib.crc32(name.encode()) + 7) % 2**63)
    return torch.randint(0, 2, shape, generator=g, dtype=torch.float64) * 2 - 1


def factor_preconditioner(sqrt_p: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (ρ, out), b (ρ, in)) with Σ_j a_j b_jᵀ the best rank-ρ approximation of √P (out, in)."""
    u, s, vh = torch.linalg.svd(sqrt_p.double(), full_matrices=False)
    rank = min(rank, len(s))
    root = s[:rank].sqrt()
    a, b = (u[:, :rank] * root).T, root[:, None] * vh[:rank]
    if a.sum() < 0:  # rank-one factors of a positive matrix: make both positive
        a, b = -a, -b
    return a.contiguous(), b.contiguous()


def preconditioner_error(sqrt_p: torch.Tensor, rank: int) -> float:
    """‖√P - Σ_j a_j b_jᵀ‖ / ‖√P‖ of the rank-ρ factorisation."""
    a, b = factor_preconditioner(sqrt_p, rank)
    approx = a.T @ b
    return float((approx - sqrt_p.double()).norm() / sqrt_p.double().norm())


@dataclass
class LayerSketch:
    """One Linear weight's projections and its √P (factors, or the full matrix for 'exact')."""

    name: str
    out_features: int
    in_features: int
    proj_out: torch.Tensor | None  # (k_out, out) or None: identity
    proj_in: torch.Tensor | None  # (k_in, in) or None
    a: torch.Tensor | None  # (ρ, out) √P's row factors ('factored'), None otherwise
    b: torch.Tensor | None  # (ρ, in)
    sqrt_p: torch.Tensor | None  # (out, in) √P ⊙ S ('exact'), None otherwise

    @property
    def k_out(self) -> int:
        return self.out_features if self.proj_out is None else self.proj_out.shape[0]

    @property
    def k_in(self) -> int:
        return self.in_features if self.proj_in is None else self.proj_in.shape[0]

    @property
    def k(self) -> int:
        return self.k_out * self.k_in


class FactoredSketch:
    """Projections for a set of LoRA Linear weights; `dim` numbers per sequence in all."""

    def __init__(
        self,
        model: torch.nn.Module,
        names: Sequence[str],
        *,
        k_in: int = 16,
        k_out: int = 16,
        seed: int = 0,
        sqrt_p: dict[str, torch.Tensor] | None = None,
        preconditioner: str = "factored",
        rank: int = 1,
        dtype: torch.dtype = torch.float32,
        random_signs: bool = True,
    ):
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}")
        if preconditioner != "none" and sqrt_p is None:
            raise ValueError(f"preconditioner '{preconditioner}' needs sqrt_p")
        self.names = list(names)
        self.targets = lora_linears(model, self.names)
        self.preconditioner = preconditioner
        self.dtype = dtype
        self.layers: dict[str, LayerSketch] = {}
        for name in self.names:
            module = self.targets[name]
            out_f, in_f = module.out_features, module.in_features
            # drawn on the CPU (the same numbers anywhere), kept beside the layer's weight
            put = dict(dtype=dtype, device=module.weight.device)
            a = b = full = None
            if preconditioner == "factored":
                a, b = (t.to(**put) for t in factor_preconditioner(sqrt_p[name].cpu(), rank))
            elif preconditioner == "exact":
                full = sqrt_p[name].double().cpu()
                if random_signs:
                    full = full * signs(tuple(full.shape), seed, name)
                full = full.to(**put)
            proj_out = projection(out_f, k_out, seed, name + ":out")
            proj_in = projection(in_f, k_in, seed, name + ":in")
            self.layers[name] = LayerSketch(
                name,
                out_f,
                in_f,
                None if proj_out is None else proj_out.to(**put),
                None if proj_in is None else proj_in.to(**put),
                a,
                b,
                full,
            )
        self.dim = sum(layer.k for layer in self.layers.values())

    # ---- the two factors of one layer, projected -------------------------------------------
    def _side(self, x: torch.Tensor, factor: torch.Tensor | None, proj) -> torch.Tensor:
        """(B, T, n) -> (B, T, ρ, k): x scaled by each row of `factor`, then projected."""
        x = x.to(self.dtype)
        x = x.unsqueeze(2) if factor is None else x.unsqueeze(2) * factor  # (B, T, ρ, n)
        return x if proj is None else x @ proj.T

    def project_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[name]
        if self.preconditioner == "exact":
            return x.to(self.dtype)  # needed whole to apply √P to the formed gradient
        return self._side(x, layer.b, layer.proj_in)

    def layer_sketch(self, name: str, x_kept: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """(B, k_out·k_in) sketch of each sequence's √P ⊙ G for this layer."""
        layer = self.layers[name]
        if self.preconditioner == "exact":
            return self.project_gradient(
                name, torch.einsum("bto,bti->boi", delta.to(self.dtype), x_kept)
            )
        d = self._side(delta, layer.a, layer.proj_out)  # (B, T, ρ, k_out)
        if d.shape[2] == 1:
            s = torch.einsum("bto,bti->boi", d[:, :, 0], x_kept[:, :, 0])
        else:
            s = torch.einsum("btjo,btji->boi", d, x_kept)
        return s.reshape(s.shape[0], -1)

    def project_gradient(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """(B, k_out·k_in) sketches of formed per-sequence gradients g (B, out, in) of one layer
        (exact P: g ⊙ √P ⊙ S, then the projections)."""
        layer = self.layers[name]
        if self.preconditioner == "factored":
            raise ValueError("formed gradients take the exact preconditioner")
        g = g.to(self.dtype)
        if layer.sqrt_p is not None:
            g = g * layer.sqrt_p
        if layer.proj_out is not None:
            g = layer.proj_out @ g
        if layer.proj_in is not None:
            g = g @ layer.proj_in.T
        return g.reshape(g.shape[0], -1)

    def from_gradients(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, dim) sketches from `fisher.sequence_gradients`' per-sequence ∇S (unscaled)."""
        return torch.cat([self.project_gradient(n, grads[n]) for n in self.names], dim=1)

    # ---- whole sequences --------------------------------------------------------------------
    def sequences(
        self,
        model,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        *,
        pad_token_id: int,
        temperature: float,
        max_tokens_per_batch: int = 4096,
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yields (sequence indices, (b, dim) sketches of √P ⊙ ∇S) batch by batch: one forward
        and one backward per batch; the inputs are projected as the forward makes them."""
        for batch, inputs, out_grads in captured_batches(
            model,
            self.targets,
            prompts,
            responses,
            pad_token_id=pad_token_id,
            temperature=temperature,
            max_tokens_per_batch=max_tokens_per_batch,
            accum_dtype=self.dtype,  # float32 suffices for a sketch; float64 in the tests
            transform=self.project_input,
        ):
            parts = [
                self.layer_sketch(n, inputs.pop(n), out_grads.pop(n).detach()) for n in self.names
            ]
            yield batch, torch.cat(parts, dim=1)

    def sketch_all(self, model, prompts, responses, **kw) -> torch.Tensor:
        """(N, dim) sketches of all sequences, in order, on the CPU."""
        out = torch.zeros(len(prompts), self.dim, dtype=self.dtype)
        for idx, rows in self.sequences(model, prompts, responses, **kw):
            out[idx] = rows.cpu()
        return out


def cosine_error_rms(
    approx: np.ndarray | torch.Tensor,
    exact: np.ndarray | torch.Tensor,
    norms_e: np.ndarray,
    norms_u: np.ndarray,
) -> float:
    """RMS over entries of |K̂ - K| / (‖g‖ ‖g'‖): the kernel's error in cosine units."""
    approx, exact = np.asarray(approx, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    scale = np.outer(np.asarray(norms_e, np.float64), np.asarray(norms_u, np.float64))
    return float(np.sqrt(np.mean(((approx - exact) / np.maximum(scale, 1e-300)) ** 2)))

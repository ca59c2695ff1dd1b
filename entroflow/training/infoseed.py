"""InfoSeed-GRPO: seed-conditioned prompts and a seed-aware auxiliary loss on top of GRPO.

Each group of G rollouts shares a problem; its slots cycle through the prompt variants
[original, seed 0, ..., seed K-1] (or seeds only, `original: false`), a seed variant being the
user's message with the template (e.g. "\\n[seed=2]") appended. The GRPO advantages are made
within the group as usual (one problem, one baseline). The training loss adds

    λ · L_seed  +  α · (H̄_original - H̄_seeded)

- L_seed makes the policy's representation of a response predictive of its seed: a rollout's
  hidden states (last layer, over its completion tokens) are pooled (`mean` or `last`) and either
  a linear seed head is trained with cross-entropy (`ce`), or a supervised contrastive InfoNCE
  loss pulls together the L2-normalised pooled states of rollouts with the same seed and pushes
  apart the others (`infonce`, temperature τ_s; no head).
- H̄_original, H̄_seeded: the policy's mean per-token entropy (at the rollout temperature) over
  the completion tokens of the original and of the seeded rollouts, from the loss pass itself.
  Minimising α (H̄_original - H̄_seeded) raises the entropy of seeded rollouts and lowers that of
  the original ones (the seed's "MI-style" term); it is a token-entropy regulariser with a
  gradient, so α = 0.5 is strong (the original prompts are the ones evaluation uses).

The completion's hidden states attend to the seed tag in the prompt, so a seed accuracy above
chance shows that the seed can be read off the policy's representation, not by itself that the
responses differ by seed.

Where this differs from liv-daliberti/maxent-grpo (src/maxent_grpo/training/ ... evaluate_losses,
read at its commit 479e91a): there, the α term is taken over the listwise sequence weights of the
two subsets, which are made from rewards and carry no gradient under its GRPO objective; here it
is taken over the policy's token entropies, which do. Its InfoNCE averages log-probabilities over
all positive pairs at once; here each anchor's positives are averaged, then the anchors (the
usual supervised contrastive form). Seeds are assigned per rollout slot within each group here,
so a problem is seen under min(G, K + 1) variants and a seed is not read off the problem alone.

The functions here are free of TRL: the trainer (training.trainer.InfoSeedGRPOTrainer) calls them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entroflow.config import schema_defaults
from entroflow.errors import EntroflowError

_INFOSEED = schema_defaults("runs", "*", "infoseed")
ORIGINAL = -1  # seed id of a rollout whose prompt carries no seed


@dataclass
class InfoSeedSettings:
    """runs.*.infoseed (see the schema for descriptions and defaults)."""

    seeds: int = _INFOSEED["seeds"]
    template: str = _INFOSEED["template"]
    original: bool = _INFOSEED["original"]
    loss: str = _INFOSEED["loss"]
    pooling: str = _INFOSEED["pooling"]
    loss_weight: float = _INFOSEED["loss_weight"]  # λ
    entropy_weight: float = _INFOSEED["entropy_weight"]  # α
    temperature: float = _INFOSEED["temperature"]  # InfoNCE's τ_s

    def __post_init__(self):
        if "{seed}" not in self.template:
            raise EntroflowError(
                f"infoseed.template: {self.template!r} has no {{seed}} placeholder for the seed id"
            )


def slot_seeds(batch: int, group_size: int, seeds: int, original: bool) -> list[int]:
    """The seed id of each rollout of a batch of consecutive groups: slot j of group g takes
    variant (j + g) mod V of the V = K + 1 variants [original, 0, ..., K-1] (V = K without the
    original). A group sees min(G, V) variants, and over any V consecutive groups every variant
    is used equally often (G = 8, V = 5: 2, 2, 2, 1, 1 times in one group, 8 each in five)."""
    if batch % group_size:
        raise ValueError(f"{batch} rollouts do not split into groups of {group_size}")
    cycle = ([ORIGINAL] if original else []) + list(range(seeds))
    return [cycle[(i % group_size + i // group_size) % len(cycle)] for i in range(batch)]


def seeded_prompt(prompt, seed: int, template: str):
    """The prompt of a rollout with seed id `seed`: the template appended to the last user
    message (chat prompts, a list of {role, content}) or to the text; unchanged for ORIGINAL."""
    if seed == ORIGINAL:
        return prompt
    tag = template.format(seed=seed)
    if isinstance(prompt, str):
        return prompt + tag
    messages = copy.deepcopy(list(prompt))
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = f"{message['content']}{tag}"
            return messages
    raise EntroflowError("infoseed: a training prompt has no user message to add the seed to")


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Per rollout, the completion's hidden states pooled: hidden (B, C, d) over its C completion
    positions, mask (B, C) 1 on real tokens. mean: their mean; last: the last real token's.
    A rollout without tokens pools to zeros. Returns (B, d) in float32 (or the input's dtype if
    wider)."""
    hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    if pooling == "last":
        last = (mask.sum(1).long() - 1).clamp(min=0)  # right-padded completions
        pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        return pooled * (mask.sum(1, keepdim=True) > 0)
    raise ValueError(f"infoseed.pooling: unknown {pooling!r}; choose mean or last")


def infonce_loss(pooled: torch.Tensor, seed_ids: torch.Tensor, temperature: float):
    """Supervised contrastive loss over rollouts (B, d) with seed ids (B,): for each anchor that
    has another rollout of its seed, minus the mean over those positives of the log-softmax of
    its cosine similarities / temperature against all other rollouts; the mean over anchors.
    None when no rollout has a positive."""
    z = F.normalize(pooled, dim=-1)
    sim = z @ z.T / temperature  # (B, B)
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_p = torch.log_softmax(sim.masked_fill(self_pair, float("-inf")), dim=-1)
    positive = (seed_ids[:, None] == seed_ids[None, :]) & ~self_pair
    anchors = positive.any(dim=-1)
    if not anchors.any():
        return None
    per_anchor = -(log_p.masked_fill(~positive, 0.0).sum(-1)) / positive.sum(-1).clamp(min=1)
    return per_anchor[anchors].mean()


def nearest_seed_accuracy(pooled: torch.Tensor, seed_ids: torch.Tensor) -> float:
    """Share of rollouts whose most cosine-similar other rollout has their seed (1-NN)."""
    if len(pooled) < 2:
        return float("nan")
    z = F.normalize(pooled.detach().double(), dim=-1)
    sim = (z @ z.T).fill_diagonal_(float("-inf"))
    return float((seed_ids[sim.argmax(-1)] == seed_ids).double().mean())


def chance_accuracy(seed_ids: torch.Tensor, loss: str) -> float:
    """The seed accuracy of a predictor that knows nothing about the responses, for this batch's
    seed counts n_k (n in all): for `ce`, always guessing the commonest seed, max_k n_k / n; for
    `infonce` (1-NN), a random other rollout, Σ_k n_k (n_k - 1) / (n (n - 1))."""
    counts = torch.unique(seed_ids, return_counts=True)[1].double()
    n = counts.sum()
    if loss == "ce":
        return float(counts.max() / n)
    return float((counts * (counts - 1)).sum() / (n * (n - 1))) if n > 1 else float("nan")


def seed_diversity(pooled: torch.Tensor, seed_ids: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the seeds' centroids of L2-normalised pooled states
    (0: the seeds' responses look alike on average; at most 2)."""
    z = F.normalize(pooled.detach().double(), dim=-1)
    centroids = torch.stack([z[seed_ids == s].mean(0) for s in seed_ids.unique()])
    if len(centroids) < 2:
        return float("nan")
    d = torch.cdist(centroids, centroids)
    k = len(centroids)
    return float(d.sum() / (k * (k - 1)))


def subset_entropy(entropies: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor):
    """Mean per-token entropy over the completion tokens of the rows picked by `rows` (B,) bool;
    entropies, mask (B, C). None when those rows hold no token."""
    m = mask[rows].to(entropies.dtype)
    if m.sum() == 0:
        return None
    return (entropies[rows] * m).sum() / m.sum()


@dataclass
class SeedTerms:
    """The auxiliary loss of one batch and its metrics (metric names without the prefix)."""

    loss: torch.Tensor | None  # λ L_seed + α (H̄_original - H̄_seeded), None: nothing to add
    metrics: dict[str, float]


def seed_terms(
    settings: InfoSeedSettings,
    pooled: torch.Tensor,
    entropies: torch.Tensor,
    mask: torch.Tensor,
    seed_ids: torch.Tensor,
    head: torch.nn.Module | None = None,
) -> SeedTerms:
    """InfoSeed's terms for a batch: pooled (B, d) states, entropies and mask (B, C), seed ids
    (B,) with ORIGINAL for unseeded rollouts; `head` maps (n, d) to (n, K) for loss `ce`."""
    has_tokens = mask.sum(-1) > 0
    seeded = (seed_ids != ORIGINAL) & has_tokens
    metrics: dict[str, float] = {}
    loss = None
    if seeded.sum() >= 2:
        z, ids = pooled[seeded], seed_ids[seeded]
        if settings.loss == "ce":
            logits = head(z)
            seed_loss = F.cross_entropy(logits, ids)
            metrics["seed_accuracy"] = float((logits.argmax(-1) == ids).double().mean())
        else:
            seed_loss = infonce_loss(z, ids, settings.temperature)
            metrics["seed_accuracy"] = nearest_seed_accuracy(z, ids)
        metrics["seed_accuracy_chance"] = chance_accuracy(ids, settings.loss)
        metrics["seed_diversity"] = seed_diversity(z, ids)
        if seed_loss is not None:
            metrics["seed_loss"] = float(seed_loss.detach())
            loss = settings.loss_weight * seed_loss
    h_seeded = subset_entropy(entropies, mask, seed_ids != ORIGINAL)
    h_original = subset_entropy(entropies, mask, seed_ids == ORIGINAL)
    for name, value in (("entropy_seeded", h_seeded), ("entropy_original", h_original)):
        if value is not None:
            metrics[name] = float(value.detach())
    if settings.entropy_weight and h_seeded is not None:
        term = -h_seeded if h_original is None else h_original - h_seeded
        loss = settings.entropy_weight * term + (0.0 if loss is None else loss)
    if loss is not None:
        metrics["aux_loss"] = float(loss.detach())  # what was added to GRPO's loss
    return SeedTerms(loss=loss, metrics=metrics)

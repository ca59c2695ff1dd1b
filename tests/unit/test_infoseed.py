"""InfoSeed-GRPO: the seed assignment and prompts, each term of its loss by hand, and a real tiny
run (metrics in the trace, the seed head saved, resumed and trained, the terms reaching LoRA)."""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from entroflow.config import ConfigError, validate_config
from entroflow.data.datasets import load_problems
from entroflow.io import read_token_file
from entroflow.training.infoseed import (
    ORIGINAL,
    InfoSeedSettings,
    chance_accuracy,
    infonce_loss,
    nearest_seed_accuracy,
    pool_hidden,
    seed_diversity,
    seed_terms,
    seeded_prompt,
    slot_seeds,
)
from entroflow.training.settings import RunSettings
from tests.conftest import digit_share


def test_infoseed_slots_cycle_through_the_prompt_variants():
    # group g's slot j takes variant (j + g) mod V of [original, 0, ..., K-1]
    assert slot_seeds(8, 4, 3, original=True) == [-1, 0, 1, 2, 0, 1, 2, -1]
    assert slot_seeds(8, 4, 4, original=False) == [0, 1, 2, 3, 1, 2, 3, 0]
    # the defaults (K = 4 with the original, G = 8): over any 5 groups each variant 8 times
    seeds = slot_seeds(80, 8, 4, original=True)
    assert seeds[:8] == [-1, 0, 1, 2, 3, -1, 0, 1]
    for start in (0, 8, 40):
        window = seeds[start : start + 40]
        assert list(np.unique(window, return_counts=True)[1]) == [8] * 5
    with pytest.raises(ValueError, match="groups of 4"):
        slot_seeds(6, 4, 2, original=True)


def test_infoseed_template_goes_on_the_last_user_message():
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    seeded = seeded_prompt(chat, 3, "\n[seed={seed}]")
    assert seeded == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?\n[seed=3]"},
    ]
    assert chat[1]["content"] == "2+2?"  # the dataset's prompt is not modified
    assert seeded_prompt(chat, ORIGINAL, "\n[seed={seed}]") is chat
    assert seeded_prompt("2+2?", 0, " <s{seed}>") == "2+2? <s0>"


def test_infoseed_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    mean = pool_hidden(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    torch.testing.assert_close(mean[1], torch.zeros(2))  # no tokens
    last = pool_hidden(hidden, mask, "last")
    torch.testing.assert_close(last[0], hidden[0, 1])
    torch.testing.assert_close(last[1], torch.zeros(2))


def infonce_by_hand(x: np.ndarray, seeds: list[int], temperature: float) -> float:
    """The supervised contrastive loss in float64 loops: per anchor with positives, the mean
    over them of -log(exp(s_ap) / Σ_{j≠a} exp(s_aj)); the mean over those anchors."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    losses = []
    for a in range(len(z)):
        positives = [p for p in range(len(z)) if p != a and seeds[p] == seeds[a]]
        if not positives:
            continue
        denom = sum(math.exp(z[a] @ z[j] / temperature) for j in range(len(z)) if j != a)
        losses.append(
            np.mean([-math.log(math.exp(z[a] @ z[p] / temperature) / denom) for p in positives])
        )
    return float(np.mean(losses))


def test_infoseed_infonce_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    seeds = [0, 0, 1, 1, 1, 2, 3]  # seeds 2 and 3 have no positive: not anchors
    got = infonce_loss(torch.tensor(x), torch.tensor(seeds), temperature=0.3)
    assert float(got) == pytest.approx(infonce_by_hand(x, seeds, 0.3), rel=1e-12)
    assert infonce_loss(torch.tensor(x[:3]), torch.tensor([0, 1, 2]), 0.3) is None


def test_infoseed_chance_accuracy_by_hand():
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    assert chance_accuracy(ids, "ce") == pytest.approx(3 / 6)  # always guess seed 0
    # a random other rollout has the anchor's seed: (3·2 + 2·1 + 1·0) / (6·5)
    assert chance_accuracy(ids, "infonce") == pytest.approx(8 / 30)


def test_infoseed_accuracy_and_diversity_by_hand():
    # Two tight clusters on orthogonal axes: 1-NN finds its own seed; centroids √2 apart.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    ids = torch.tensor([0, 0, 1, 1])
    assert nearest_seed_accuracy(x, ids) == 1.0
    assert nearest_seed_accuracy(x, torch.tensor([0, 1, 0, 1])) == 0.0
    z = torch.nn.functional.normalize(x.double(), dim=-1)
    expected = float(torch.linalg.norm(z[:2].mean(0) - z[2:].mean(0)))
    assert seed_diversity(x, ids) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(math.sqrt(2), abs=0.02)
    assert seed_diversity(torch.ones(4, 2), ids) == pytest.approx(0.0, abs=1e-12)


def test_infoseed_loss_terms_by_hand():
    torch.manual_seed(0)
    b, c, d, k = 6, 4, 3, 2
    pooled = torch.randn(b, d, dtype=torch.float64)
    entropies = torch.rand(b, c, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]] * 5 + [[0, 0, 0, 0]])  # the last rollout is empty
    ids = torch.tensor([ORIGINAL, 0, 1, ORIGINAL, 0, 1])
    head = torch.nn.Linear(d, k).double()
    settings = InfoSeedSettings(seeds=k, loss="ce", loss_weight=0.3, entropy_weight=0.5)
    terms = seed_terms(settings, pooled, entropies, mask, ids, head=head)
    seeded = torch.tensor([1, 2, 4])  # seeded rollouts with tokens
    ce = torch.nn.functional.cross_entropy(head(pooled[seeded]), ids[seeded])
    m = mask.double()
    h_orig = (entropies[[0, 3]] * m[[0, 3]]).sum() / m[[0, 3]].sum()
    h_seed = (entropies[[1, 2, 4, 5]] * m[[1, 2, 4, 5]]).sum() / m[[1, 2, 4, 5]].sum()
    expected = 0.3 * ce + 0.5 * (h_orig - h_seed)
    assert float(terms.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    assert terms.metrics["seed_loss"] == pytest.approx(float(ce), rel=1e-12)
    assert terms.metrics["aux_loss"] == pytest.approx(float(expected.detach()), rel=1e-12)
    assert terms.metrics["seed_accuracy_chance"] == pytest.approx(2 / 3)  # seeds 0, 1, 0
    assert terms.metrics["entropy_original"] == pytest.approx(float(h_orig), rel=1e-12)
    assert terms.metrics["entropy_seeded"] == pytest.approx(float(h_seed), rel=1e-12)
    predicted = head(pooled[seeded]).argmax(-1)
    assert terms.metrics["seed_accuracy"] == pytest.approx(
        float((predicted == ids[seeded]).double().mean())
    )
    terms.loss.backward()  # the entropy term carries gradient to the policy's entropies
    assert entropies.grad[0, 0] == pytest.approx(0.5 / 6) and entropies.grad[1, 0] == pytest.approx(
        -0.5 / 9
    )
    # Without originals the term is -α H̄_seeded; α = 0 and λ = 0 leave nothing to add.
    no_orig = seed_terms(
        settings, pooled, entropies, mask, torch.tensor([0, 1, 0, 1, 0, 1]), head=head
    )
    assert "entropy_original" not in no_orig.metrics
    off = InfoSeedSettings(seeds=k, loss="infonce", loss_weight=0.0, entropy_weight=0.0)
    assert float(seed_terms(off, pooled, entropies, mask, ids).loss) == 0.0


# ---------------------------------------------------------------- config


def demo_config():
    with open("config/config.yaml") as f:
        return yaml.safe_load(f)


def test_infoseed_config_is_checked():
    config = demo_config()
    run = config["runs"]["demo"]
    run.update(algorithm="infoseed_grpo", infoseed={"seeds": 6, "loss": "ce", "pooling": "last"})
    run["delta_h"]["enabled"] = False
    run["fisher"]["enabled"] = False
    checked = validate_config(copy.deepcopy(config))["runs"]["demo"]["infoseed"]
    assert (
        checked["seeds"] == 6
        and checked["loss_weight"] == 0.01
        and checked["entropy_weight"] == 0.5
    )
    bad = copy.deepcopy(config)
    bad["runs"]["demo"]["infoseed"]["template"] = "[seed]"
    with pytest.raises(ConfigError, match=r"runs.demo.infoseed.template"):
        validate_config(bad)
    stage = copy.deepcopy(config)
    stage["runs"]["demo"]["delta_h"]["enabled"] = True
    with pytest.raises(
        ConfigError, match=r"runs.demo.delta_h: not available for algorithm infoseed_grpo"
    ):
        validate_config(stage)
    ds = copy.deepcopy(config)
    ds["runs"]["demo"]["deepspeed_config"] = "config/config.yaml"  # any existing file
    with pytest.raises(ConfigError, match=r"runs.demo.deepspeed_config: not with infoseed_grpo"):
        validate_config(ds)
    other = copy.deepcopy(config)
    other["runs"]["demo"]["algorithm"] = "dr_grpo"
    with pytest.raises(
        ConfigError, match=r"runs.demo.infoseed: settings of algorithm infoseed_grpo"
    ):
        validate_config(other)


# ---------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def problems():
    return load_problems("t", {"preset": "arithmetic", "n": 32, "seed": 5})


BASE = dict(
    steps=2, save_every=1, group_size=4, prompts_per_step=2, max_new_tokens=8, learning_rate=5e-3
)


def infoseed_run(training_model_dir, problems, out, **infoseed):
    from entroflow.training.run import train_policy

    settings = RunSettings(**BASE, algorithm="infoseed_grpo", infoseed={"seeds": 3, **infoseed})
    train_policy(settings, training_model_dir, problems, str(out), reward_funcs=[digit_share])
    return [json.loads(x) for x in (out / "trace/manifest.jsonl").read_text().splitlines()]


def test_infoseed_grpo_trains_logs_saves_and_resumes_its_seed_head(
    training_model_dir, problems, tmp_path
):
    from entroflow.training.trainer import SEED_HEAD_FILE, SEED_HEAD_PREFIX

    out = tmp_path / "ce"
    rows = infoseed_run(training_model_dir, problems, out, loss="ce", loss_weight=1.0)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in (
            "seed_loss",
            "seed_accuracy",
            "seed_diversity",
            "entropy_original",
            "entropy_seeded",
        ):
            assert np.isfinite(r[f"infoseed/{key}"]), key
        assert r["infoseed/seed_loss"] > 0 and 0 <= r["infoseed/seed_accuracy"] <= 1
    # Group g's slots take variants rotated by g; the trace records each response's seed and
    # points it at its own (seeded) prompt.
    table = read_token_file(out / "trace" / rows[0]["file"])
    seeds = table["responses/seed"]
    np.testing.assert_array_equal(seeds, [ORIGINAL, 0, 1, 2, 0, 1, 2, ORIGINAL])
    prompts = [table["prompts/text"][i] for i in table["responses/prompt_index"]]
    assert len(table["prompts/text"]) == 8
    for seed, prompt in zip(seeds, prompts, strict=True):
        assert prompt.endswith(f"\n[seed={seed}]") if seed != ORIGINAL else "[seed=" not in prompt
    heads = [load_file(out / f"checkpoint-{s}" / SEED_HEAD_FILE) for s in (1, 2)]
    assert not torch.equal(heads[0]["weight"], heads[1]["weight"])  # the head trains
    names = json.loads((out / "checkpoint-2/optimizer_param_names.json").read_text())
    assert names[-1] == [SEED_HEAD_PREFIX + "weight", SEED_HEAD_PREFIX + "bias"]
    # Resume from checkpoint-1 after losing checkpoint-2: the head and its AdamW state are
    # restored, so the re-made checkpoint-2 holds the uninterrupted run's head.
    shutil.rmtree(out / "checkpoint-2")
    infoseed_run(training_model_dir, problems, out, loss="ce", loss_weight=1.0)
    resumed = load_file(out / "checkpoint-2" / SEED_HEAD_FILE)
    torch.testing.assert_close(resumed["weight"], heads[1]["weight"], atol=1e-6, rtol=1e-5)


def test_infoseed_terms_reach_the_adapter(training_model_dir, problems, tmp_path):
    """Step 1's rollouts are the same in the three runs (same seed, same initial policy), so
    checkpoint-1's adapters differ only by the gradient of the seed terms."""

    def adapter(name, **infoseed):
        infoseed_run(training_model_dir, problems, tmp_path / name, **infoseed)
        return load_file(tmp_path / name / "checkpoint-1/adapter_model.safetensors")

    plain = adapter("plain", loss_weight=0.0, entropy_weight=0.0)
    nce = adapter("infonce", loss_weight=1.0, entropy_weight=0.0)
    ent = adapter("entropy", loss_weight=0.0, entropy_weight=1.0)
    for other in (nce, ent):
        assert any(not torch.allclose(plain[n], other[n], atol=1e-7) for n in plain)


def test_infoseed_ce_head_on_two_processes(training_model_dir, problems, tmp_path):
    """DDP does not reach the seed head: its gradients are averaged by hand on every rank (a
    rank that skipped the reduce would hang the run)."""
    from entroflow.training.run import train_policy
    from entroflow.training.trainer import SEED_HEAD_FILE

    settings = RunSettings(
        **{**BASE, "steps": 2, "save_every": 2},
        algorithm="infoseed_grpo",
        processes=2,
        infoseed={"seeds": 3, "loss": "ce", "loss_weight": 1.0},
    )
    out = tmp_path / "ddp"
    train_policy(
        settings, training_model_dir, problems, str(out), reward_funcs=[digit_share], threads=2
    )
    rows = [json.loads(x) for x in (out / "trace/manifest.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["world_size"] == 2 for r in rows)
    assert all(np.isfinite(r["infoseed/seed_loss"]) for r in rows)
    assert set(load_file(out / "checkpoint-2" / SEED_HEAD_FILE)) == {"weight", "bias"}

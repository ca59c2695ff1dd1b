"""Shared fixtures: tiny models built in the test session (never downloaded), and the demo run."""

from __future__ import annotations

import os

import torch

# Without CUDA the fused entropy kernel is tested in Triton's interpreter (CPU tensors). The
# variable is read when the kernel is defined, so before anything imports entroflow.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from entroflow.lm.demo_model import corpus, train_tokenizer


def _rms_norm_f64(self, x):
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def float64_norms(model):
    """HF's RMSNorm computes in float32 even in a float64 model; oracles need it in float64."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    for module in model.modules():
        if isinstance(module, Qwen3RMSNorm):
            module.forward = types.MethodType(_rms_norm_f64, module)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer([full for _, full in corpus(300, seed=0)], vocab_size=300)


def make_tiny_family_model(
    family: str, tokenizer, seed: int = 0, dtype=torch.float32, hidden: int = 32, **extra
):
    """A tiny random `<family>ForCausalLM` (Qwen3, Llama, Cohere, ...) with a sharpened head."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
        **extra,
    )
    model = getattr(transformers, f"{family}ForCausalLM")(config).to(dtype).eval()
    # Random init is near-uniform; sharper logits make the tests discriminating.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def make_tiny_model(tokenizer, seed: int = 0, dtype=torch.float32, hidden: int = 32):
    """The tiny Qwen3 most tests use (the demo model's architecture)."""
    return make_tiny_family_model(
        "Qwen3", tokenizer, seed, dtype=dtype, hidden=hidden, head_dim=hidden // 4
    )


def save_tiny_model(folder: Path, tokenizer, seed: int) -> Path:
    """A tiny model + tokenizer as a from_pretrained folder (a `source: local` model entry)."""
    make_tiny_model(tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def digit_share(prompts, completions, **kwargs):
    """A TRL reward the random tiny model earns unevenly, so advantages and updates are non-zero
    (importable by name: the ranks of a multi-process run import it)."""
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


@pytest.fixture(scope="session")
def training_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """The tiny model the training tests start from (seed 11), saved once per session."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_tokenizer, seed=11))


def tiny_config(model_dir: Path, n_problems: int, experiments: dict[str, dict]) -> dict:
    """A workflow config: `n_problems` builtin arithmetic problems, the tiny model at `model_dir`,
    and one single-shard experiment per entry of `experiments` (name -> extra settings)."""
    return {
        "datasets": {"arith": {"preset": "arithmetic", "n": n_problems}},
        "models": {"tiny": {"source": "local", "path": str(model_dir)}},
        "experiments": {
            name: {"model": "tiny", "dataset": "arith", "shards": 1, **extra}
            for name, extra in experiments.items()
        },
    }


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


@dataclass
class DemoRun:
    work: Path  # the --directory of the run
    scheduler: str  # "slurm" or "local"
    why_local: str = ""  # why no Slurm cluster was used
    jobs: list[dict[str, str]] = field(default_factory=list)  # Slurm's record of every job


# Cluster-size knobs for the one-node test cluster (the profile's defaults are sized for real
# GPU nodes); status polling every 2 s instead of the plugin's production pace.
SLURM_TEST_ARGS = (
    "--default-resources",
    "mem_mb=3000",
    "runtime=60",
    "--set-resources",
    "generate_responses:mem_mb=3000",
    "score_entropy:mem_mb=3000",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "2",
)


def repository_copy(target: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) copied to `target`, symlinks
    kept: a fresh checkout to run the workflow's own commands in, verbatim, from its root."""
    import shutil
    import subprocess

    from tests.workflow.test_workflow import ROOT

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source, copy = ROOT / name, target / name
        if not source.exists() and not source.is_symlink():  # deleted, not yet committed
            continue
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, copy, follow_symlinks=False)
    return target


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """`make demo`'s DAG with the unchanged config, run once per test session in a copy of the
    repository, from its root, as a user types it: `snakemake --profile slurm` on a real local
    Slurm cluster where one can be started (root and Debian's packages; ENTROFLOW_TEST_SLURM=0
    opts out), else `snakemake --cores 2` with the local executor."""
    from tests.slurm.cluster import LocalSlurm, unavailable_reason
    from tests.workflow.test_workflow import snakemake

    work = repository_copy(tmp_path_factory.mktemp("demo"))
    why_local = (
        "ENTROFLOW_TEST_SLURM=0"
        if os.environ.get("ENTROFLOW_TEST_SLURM") == "0"
        else unavailable_reason()
    )
    if why_local:
        result = snakemake("--cores", "2", cwd=work, timeout=1800)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return DemoRun(work, "local", why_local)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        # The README's command; then only the one-node test cluster's sizes and polling pace.
        result = snakemake("--profile", "slurm", *SLURM_TEST_ARGS, cwd=work, timeout=2700)
        jobs = cluster.jobs()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return DemoRun(work, "slurm", jobs=jobs)

"""Shared fixtures: tiny models built in the test session, never downloaded."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from entroflow.demo_model import corpus, train_tokenizer


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


def make_tiny_model(tokenizer, seed: int = 0, dtype=torch.float32, hidden: int = 32):
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config).to(dtype).eval()
    # Random init is near-uniform; sharper logits make the tests discriminating.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)

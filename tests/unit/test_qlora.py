"""QLoRA (runs.<run>.lora.quantize): a 4-bit bitsandbytes base under a trained LoRA adapter, on
CPU, and the checkpoint stages' de-quantized base computing the same function."""

import importlib.util

import pytest
import torch

from entroflow.config import ConfigError, validate_config
from entroflow.lm.checkpoints import load_policy
from entroflow.lm.models import ModelError, check_quantize, load_model
from entroflow.training.run import prompts_dataset, train_policy
from entroflow.training.trainer import RunSettings, build_trainer
from tests.conftest import digit_share
from tests.unit.test_config import RUN
from tests.unit.test_training_run import problems  # noqa: F401

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'entroflow[qlora]')",
)
SETTINGS = dict(
    steps=2, save_every=2, group_size=4, prompts_per_step=2, max_new_tokens=8, learning_rate=5e-2
)


def four_bit_layers(model) -> list[str]:
    from bitsandbytes.nn import Linear4bit, Params4bit

    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, Linear4bit) and isinstance(m.weight, Params4bit)
    ]


@needs_bnb
def test_qlora_trains_two_steps_on_a_4bit_base(
    training_model_dir,
    problems,  # noqa: F811
    tiny_tokenizer,
    tmp_path,
):
    settings = RunSettings(**SETTINGS, lora_quantize="nf4")
    model = load_model(training_model_dir, quantize="nf4", double_quant=settings.lora_double_quant)
    trainer = build_trainer(
        settings,
        model,
        tiny_tokenizer,
        prompts_dataset(problems),
        str(tmp_path),
        reward_funcs=[digit_share],
    )
    quantized = four_bit_layers(trainer.model)
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down of both layers; not the head
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    adapter = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
    }
    assert adapter and all("lora_" in n for n in adapter)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(adapter[n], after[n]) for n in adapter if "lora_B" in n)
    assert all(torch.equal(base[n], after[n]) for n in base)  # the 4-bit codes stay as loaded
    assert four_bit_layers(trainer.model) == quantized

    # The checkpoint stages' base: the same 4-bit weights, de-quantized to plain layers.
    checkpoint = tmp_path / "checkpoint-2"
    policy = load_policy(
        training_model_dir, checkpoint, merge=False, quantize="nf4", double_quant=True
    )
    assert not four_bit_layers(policy)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    trainer.model.eval()
    with torch.no_grad():
        trained, loaded = trainer.model(input_ids=ids).logits, policy(input_ids=ids).logits
        with trainer.model.disable_adapter(), policy.disable_adapter():
            base_4bit, base_plain = (
                trainer.model(input_ids=ids).logits,
                policy(input_ids=ids).logits,
            )
    torch.testing.assert_close(base_plain, base_4bit, rtol=1e-5, atol=1e-5)
    # The adapter as trained (in bfloat16: TRL's QLoRA cast), loaded in float32: the same
    # weights; the logits then differ by the adapter's bfloat16 matmuls only.
    trained_adapter = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    for name, param in policy.named_parameters():
        if "lora_" in name:
            assert param.dtype == torch.float32
            torch.testing.assert_close(param, trained_adapter[name].float(), rtol=0, atol=0)
    assert (loaded - trained).abs().max() < 0.02 * trained.abs().max()
    unquantized = load_policy(training_model_dir, checkpoint, merge=False)
    with torch.no_grad(), unquantized.disable_adapter():
        assert not torch.allclose(unquantized(input_ids=ids).logits, base_4bit, atol=1e-3)


@needs_bnb
def test_train_policy_with_quantize_writes_checkpoints(training_model_dir, problems, tmp_path):  # noqa: F811
    one_step = {**SETTINGS, "steps": 1, "save_every": 1, "max_new_tokens": 4}
    settings = RunSettings(**one_step, lora_quantize="fp4", precision={"entropy_dtype": "float64"})
    summary = train_policy(
        settings, training_model_dir, problems, str(tmp_path), reward_funcs=[digit_share]
    )
    assert (tmp_path / "checkpoint-1" / "adapter_model.safetensors").exists()
    assert (tmp_path / "trace").is_dir() and summary


@needs_bnb
def test_4bit_base_passes_gradients_after_an_eval_forward(training_model_dir):  # noqa: F811
    """The base's input gradients survive a no-grad eval forward (generation, the trace pass):
    bitsandbytes' own CPU repack would drop them from then on (models.keep_4bit_differentiable)."""
    model = load_model(training_model_dir, quantize="nf4")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(input_ids=ids)  # eval mode, no grad
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeddings).logits.sum().backward()
    exact = load_model(training_model_dir, quantize="nf4", dequantize=True)
    reference = embeddings.detach().clone().requires_grad_(True)
    exact(inputs_embeds=reference).logits.sum().backward()
    torch.testing.assert_close(embeddings.grad, reference.grad, rtol=1e-4, atol=1e-4)


def test_quantize_config_is_accepted_and_checked(monkeypatch):
    if importlib.util.find_spec("bitsandbytes") is not None:
        run = validate_config(RUN(lora={"quantize": "nf4"}))["runs"]["r"]
        assert run["lora"] == {**run["lora"], "quantize": "nf4", "double_quant": True}
    assert validate_config(RUN())["runs"]["r"]["lora"]["quantize"] is None
    with pytest.raises(ConfigError, match=r"runs.r.lora.quantize: 'int8' is not one of"):
        validate_config(RUN(lora={"quantize": "int8"}))
    with pytest.raises(ConfigError, match=r"^config: runs.r.probe_sequences: a sampled probe"):
        validate_config(RUN(lora={"quantize": "nf4"}, probe_sequences=4))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(ConfigError) as err:
        validate_config(RUN(lora={"quantize": "nf4"}))
    assert str(err.value) == (
        "config: runs.r.lora.quantize: quantize 'nf4' needs the bitsandbytes package "
        "(pip install 'entroflow[qlora]')"
    )
    with pytest.raises(ModelError, match="needs the bitsandbytes package"):
        check_quantize("fp4")

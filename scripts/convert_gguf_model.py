"""Rule convert_gguf_model: a GGUF file -> a plain Hugging Face folder under resources/models/gguf/."""

from pathlib import Path

from entroflow.lm.models import convert_gguf
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
convert_gguf(Path(snakemake.input[0]), snakemake.output[0])

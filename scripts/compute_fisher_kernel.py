"""Rule compute_fisher_kernel: per-sequence gradients (streamed to disk) -> K₁ and its checks."""

import json
from pathlib import Path

import torch

from entroflow.checkpoint.delta_h_run import RunShape
from entroflow.checkpoint.fisher_run import FisherSettings, fisher_kernel_stage
from entroflow.io import TokenTable, read_token_file, write_token_file
from entroflow.lm.checkpoints import load_adam_state, load_policy
from entroflow.lm.models import load_tokenizer
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
checkpoint, cfg = snakemake.params.checkpoint, snakemake.params.settings
adam_state = load_adam_state(checkpoint)
tokenizer = load_tokenizer(snakemake.input.model)
model = load_policy(snakemake.input.model, checkpoint, dtype="float32", merge=False).double()
e_batch = read_token_file(snakemake.input.delta_h, root="e_batch")
u_batch = read_token_file(snakemake.input.delta_h, root="u_batch")
store = Path(snakemake.params.gradients)
try:
    datasets, summary = fisher_kernel_stage(
        model,
        tokenizer,
        e_batch,
        u_batch,
        adam_state,
        RunShape(**cfg["run"]),
        FisherSettings(**cfg["fisher"]),
        store,
    )
finally:
    if store.suffix == ".tmp":
        store.unlink(missing_ok=True)  # temporary by default (keep_gradients: true keeps it)
table = TokenTable(
    groups={"": datasets},
    attrs={
        "checkpoint": str(checkpoint),
        "step": int(snakemake.wildcards.step),
        "settings": json.dumps(cfg),
        **summary,
    },
)
write_token_file(snakemake.output[0], table)
log.info("%s", json.dumps(summary))

"""Rule estimate_delta_h: ΔH(η) ground truth vs δH₁(η) and the covariance predictor for one checkpoint -> delta_h/checkpoint-{step}.h5."""

import json
from pathlib import Path

import torch

from entroflow.checkpoint.delta_h_run import (
    MAXENT_STATE_FILE,
    DeltaHSettings,
    RunShape,
    estimate_delta_h,
)
from entroflow.data.datasets import read_problems
from entroflow.io import write_token_file
from entroflow.lm.checkpoints import load_adam_state, load_policy
from entroflow.lm.models import encode_prompts, load_tokenizer
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
checkpoint, cfg = snakemake.params.checkpoint, snakemake.params.settings
adam_state = load_adam_state(checkpoint)  # fails first, naming the folder, if the state is missing
tokenizer = load_tokenizer(snakemake.input.model)
model = load_policy(
    snakemake.input.model, checkpoint, dtype=snakemake.params.model["dtype"], merge=False
)
problems = read_problems(snakemake.input.problems)
prompt_ids = encode_prompts(
    tokenizer, list(problems["prompt"]), snakemake.params.model["system_prompt"]
)
settings = DeltaHSettings(**cfg["delta_h"])
maxent_state = Path(checkpoint) / MAXENT_STATE_FILE  # maxent_grpo: τ, β at the checkpoint
run = RunShape(
    **cfg["run"],
    maxent_state=json.loads(maxent_state.read_text()) if maxent_state.exists() else {},
)
table, summary = estimate_delta_h(model, tokenizer, problems, prompt_ids, adam_state, run, settings)
table.attrs = {
    "checkpoint": str(checkpoint),
    "step": int(snakemake.wildcards.step),
    "settings": json.dumps(cfg),
    **{k: v for k, v in summary.items()},
}
write_token_file(snakemake.output[0], table)
log.info("%s", json.dumps(summary))

"""Rule estimate_delta_h: ΔH(η) ground truth vs δH₁(η) and the covariance predictor for one checkpoint -> delta_h/checkpoint-{step}.h5."""

import torch

from entroflow.checkpoint.delta_h_run import estimate_delta_h
from entroflow.checkpoint.detailed_log import log_folder
from entroflow.checkpoint.replay import read_maxent_state
from entroflow.checkpoint.settings import DeltaHSettings, RunShape, recorded_settings
from entroflow.data.datasets import read_problems
from entroflow.lm.checkpoints import load_adam_state, load_stage_policy
from entroflow.lm.models import encode_prompts, load_tokenizer
from entroflow.lm.precision import apply_precision
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
checkpoint, cfg = snakemake.params.checkpoint, snakemake.params.settings
adam_state = load_adam_state(checkpoint)  # fails first, naming the folder, if the state is missing
tokenizer = load_tokenizer(snakemake.input.model)
settings, model_entry = DeltaHSettings(**cfg["delta_h"]), snakemake.params.model
with apply_precision(settings.precision, f"runs.{snakemake.wildcards.run}.delta_h.precision") as p:
    model = load_stage_policy(snakemake.input.model, checkpoint, model_entry, p)
    problems = read_problems(snakemake.input.problems)
    prompt_ids = encode_prompts(tokenizer, list(problems["prompt"]), model_entry["system_prompt"])
    run = RunShape(**cfg["run"], maxent_state=read_maxent_state(checkpoint))
    result = estimate_delta_h(
        model,
        tokenizer,
        problems,
        prompt_ids,
        adam_state,
        run,
        settings,
        log_folder(snakemake.log[0]),  # detailed logs: logs/estimate_delta_h/{run}.{step}/
    )
result.checkpoint, result.step = checkpoint, int(snakemake.wildcards.step)
result.settings = recorded_settings(cfg)  # the same file at every logging level
result.write(snakemake.output[0])
log.info("%s", result.attributes())

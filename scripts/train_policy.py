"""Rule train_policy: GRPO-family training with LoRA -> checkpoints, trace, run.json. Resumes."""

import torch

from entroflow.data.datasets import read_problems
from entroflow.logs import setup_logging
from entroflow.provenance import run_spec, write_record
from entroflow.training.run import train_policy
from entroflow.training.trainer import RunSettings

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
s = dict(snakemake.params.settings)
lora = s.pop("lora")
# report_to is not a param (no rerun for a tracker): from the config, applied when training runs.
settings = RunSettings(
    **s,
    lora_rank=lora["rank"],
    lora_alpha=lora["alpha"],
    lora_targets=lora["targets"],
    lora_quantize=lora.get("quantize"),
    lora_double_quant=lora.get("double_quant", True),
    report_to=snakemake.config["runs"][snakemake.wildcards.run]["report_to"],
)
summary = train_policy(
    settings,
    snakemake.input.model,
    read_problems(snakemake.input.problems),
    snakemake.params.output_dir,
    dtype=snakemake.params.model["dtype"],
    system_prompt=snakemake.params.model["system_prompt"],
    code=snakemake.params.library,  # a code change retrains rather than resumes stale checkpoints
    threads=snakemake.threads,  # shared among the processes when runs.*.processes > 1
)
if "reward_mean" in summary:
    log.info("reward %.3f -> %.3f", summary["reward_mean"]["first"], summary["reward_mean"]["last"])
config = snakemake.config
write_record(
    snakemake.output.run, config["_config_files"], run_spec(config, snakemake.wildcards.run)
)

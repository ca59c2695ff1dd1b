"""Rule evaluate_temperature_cell: accuracy when forking tokens are sampled at T_high, others at T_low."""

import json

import torch

from entroflow.data.datasets import read_problems
from entroflow.engines import ForkingTemperature, SamplingParams, get_engine
from entroflow.eval.evaluation import evaluate, summarize
from entroflow.io import read_json
from entroflow.lm.models import encode_prompts, load_model, load_tokenizer
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
sweep, model_cfg = snakemake.params.sweep, snakemake.params.model
problems = read_problems(snakemake.input.problems)
if sweep["limit"]:
    problems = problems.iloc[: sweep["limit"]].reset_index(drop=True)
threshold = sweep["threshold"]
if threshold is None:
    threshold = read_json(snakemake.input.stats)["forking_threshold"]
forking = ForkingTemperature(
    threshold=float(threshold),
    t_high=float(snakemake.wildcards.t_high),
    t_low=float(snakemake.wildcards.t_low),
    base_temperature=float(snakemake.params.base_temperature),
)
log.info("%s on %d problems", forking, len(problems))
tokenizer = load_tokenizer(snakemake.input.model)
model = load_model(snakemake.input.model, dtype=model_cfg["dtype"])
prompt_ids = encode_prompts(
    tokenizer,
    list(problems["prompt"]),
    model_cfg["system_prompt"],
    model_cfg["chat_template_kwargs"],
)
params = SamplingParams(
    max_new_tokens=sweep["max_new_tokens"],
    samples_per_prompt=sweep["samples_per_prompt"],
    forking=forking,
)
header = {"forking": forking.__dict__, "sweep": sweep, "model": model_cfg["name"]}
engine = get_engine("hf", model=model, tokenizer=tokenizer, batch_size=64)
results = evaluate(
    engine,
    problems,
    prompt_ids,
    tokenizer,
    params,
    sweep["seeds"],
    snakemake.params.progress,
    header,
)
summary = {**forking.__dict__, **summarize(results, sweep["k"])}
with open(snakemake.output[0], "w") as f:
    json.dump(summary, f, indent=2)
log.info("%s", summary)

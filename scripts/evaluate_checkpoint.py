"""Rule evaluate_checkpoint: Pass@k / Avg@k of one checkpoint on one dataset; resumes from its
progress file."""

import torch

from entroflow.data.datasets import read_problems
from entroflow.engines import SamplingParams, get_engine
from entroflow.eval.evaluation import evaluate, per_seed_metrics, summarize
from entroflow.io import write_json_atomic
from entroflow.lm.checkpoints import load_policy
from entroflow.lm.models import encode_prompts, load_tokenizer
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
ev, checkpoint = snakemake.params.eval, snakemake.params.checkpoint
dataset = snakemake.wildcards.dataset
problems = read_problems(snakemake.input.problems)
tokenizer = load_tokenizer(snakemake.input.model)
model = load_policy(
    snakemake.input.model,
    checkpoint,
    dtype=snakemake.params.model["dtype"],
    quantize=snakemake.params.model.get("quantize"),
    double_quant=snakemake.params.model.get("double_quant", True),
)
prompt_ids = encode_prompts(
    tokenizer, list(problems["prompt"]), snakemake.params.model["system_prompt"]
)
params = SamplingParams(
    temperature=ev["temperature"],
    max_new_tokens=ev["max_new_tokens"],
    samples_per_prompt=ev["samples_per_prompt"],
)
header = {"checkpoint": str(checkpoint), "dataset": dataset, **{k: ev[k] for k in sorted(ev)}}
engine = get_engine("hf", model=model, tokenizer=tokenizer, batch_size=64)
results = evaluate(
    engine, problems, prompt_ids, tokenizer, params, ev["seeds"], snakemake.params.progress, header
)
per_seed = per_seed_metrics(results, ev["k"])
summary = {
    "checkpoint": str(checkpoint),
    "step": int(snakemake.wildcards.step),
    "dataset": dataset,
    **summarize(results, ev["k"]),
    # metric -> seed -> value (averaged over the prompts): the table's error bars
    "per_seed": {m: {str(s): float(v) for s, v in per_seed[m].items()} for m in per_seed},
}
write_json_atomic(snakemake.output[0], summary)
log.info("%s", summary)

"""Rule evaluate_checkpoint: Pass@k / Avg@k of one checkpoint; resumes from its progress file."""

import json

import torch

from entroflow.data.datasets import read_problems
from entroflow.engines import SamplingParams, get_engine
from entroflow.eval.evaluation import evaluate, summarize
from entroflow.lm.checkpoints import load_policy
from entroflow.lm.models import encode_prompts, load_tokenizer
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
ev, checkpoint = snakemake.params.eval, snakemake.params.checkpoint
problems = read_problems(snakemake.input.problems)
tokenizer = load_tokenizer(snakemake.input.model)
model = load_policy(snakemake.input.model, checkpoint, dtype=snakemake.params.model["dtype"])
prompt_ids = encode_prompts(
    tokenizer, list(problems["prompt"]), snakemake.params.model["system_prompt"]
)
params = SamplingParams(
    temperature=ev["temperature"],
    max_new_tokens=ev["max_new_tokens"],
    samples_per_prompt=ev["samples_per_prompt"],
)
header = {"checkpoint": str(checkpoint), "dataset": ev["dataset"], **{k: ev[k] for k in sorted(ev)}}
engine = get_engine("hf", model=model, tokenizer=tokenizer, batch_size=64)
results = evaluate(
    engine, problems, prompt_ids, tokenizer, params, ev["seeds"], snakemake.params.progress, header
)
summary = {
    "checkpoint": str(checkpoint),
    "step": int(snakemake.wildcards.step),
    **summarize(results, ev["k"]),
}
with open(snakemake.output[0], "w") as f:
    json.dump(summary, f, indent=2)
log.info("%s", summary)

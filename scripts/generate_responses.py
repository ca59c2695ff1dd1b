"""Rule generate_responses: sample this shard's responses -> shards/generated.{i}-of-{n}.h5.

Finished batches are saved under `<output>.partial/`; a rerun after preemption continues there.
"""

import dataclasses
import types

import torch
from transformers import AutoConfig

from entroflow.data.datasets import read_problems
from entroflow.engines import SamplingParams, get_engine
from entroflow.io import write_token_file
from entroflow.journal import BatchJournal, journal_folder
from entroflow.lm.models import context_length, encode_prompts, load_model, load_tokenizer
from entroflow.logs import ProgressLog, setup_logging
from entroflow.tokens.pipeline import generate_shard, generation_key

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
model_cfg, gen = snakemake.params.model, snakemake.params.generation
model_dir = snakemake.input.model
shard, n_shards = int(snakemake.wildcards.shard), int(snakemake.wildcards.n_shards)

problems = read_problems(snakemake.input.problems)
tokenizer = load_tokenizer(model_dir)
if gen["engine"] == "sglang":  # sglang loads the weights itself, on its own GPUs
    model = types.SimpleNamespace(config=AutoConfig.from_pretrained(model_dir))
    engine = get_engine(
        "sglang",
        model_path=model_dir,
        tokenizer=tokenizer,
        batch_size=gen["batch_size"],
        tp_size=gen["tensor_parallel_size"],
        dtype=model_cfg["dtype"],
        seed=gen["sampling"]["seed"] + shard,
    )
    device = f"cuda (sglang, tensor parallel {gen['tensor_parallel_size']})"
else:
    model = load_model(model_dir, dtype=model_cfg["dtype"])
    engine = get_engine(
        "hf",
        model=model,
        tokenizer=tokenizer,
        batch_size=gen["batch_size"],
        decoder=gen.get("decoder", "auto"),
        static_options={
            "compile": "auto" if gen.get("compile", True) else False,
            "refill": gen.get("refill_queue", 0) > 0,
        },
    )
    log.info("hf engine: %s decoder", engine.decoder)
    device = str(next(model.parameters()).device)
prompt_ids = encode_prompts(
    tokenizer,
    list(problems["prompt"]),
    model_cfg["system_prompt"],
    model_cfg["chat_template_kwargs"],
)
params = SamplingParams(**gen["sampling"])
# One engine call per saved batch: batch_size sequences, or refill_queue times as many.
sequences_per_call = gen["batch_size"] * max(1, gen.get("refill_queue", 0))
prompts_per_batch = max(1, sequences_per_call // params.samples_per_prompt)
settings = {
    "params": dataclasses.asdict(params),
    "shard": [shard, n_shards],
    "prompts_per_batch": prompts_per_batch,
    "engine": gen["engine"],
    "dtype": model_cfg["dtype"],
    **{key: gen[key] for key in ("decoder", "compile") if key in gen},  # set only if not default
    **({"refill_queue": gen["refill_queue"]} if gen.get("refill_queue") else {}),  # same: if on
}
journal = BatchJournal(
    journal_folder(snakemake.output[0]), generation_key(prompt_ids, model_dir, settings)
)
log.info("shard %d of %d, %s", shard + 1, n_shards, params)
table = generate_shard(
    problems,
    prompt_ids,
    engine,
    tokenizer,
    params,
    shard,
    n_shards,
    context=context_length(model),
    attrs={
        "model": model_cfg["name"],
        "model_path": model_cfg["path"],
        "model_revision": model_cfg["revision"] or "",
        "dataset": gen["dataset"],
        "engine": gen["engine"],
        "device": device,
    },
    progress=ProgressLog("generated", "prompts", log),
    prompts_per_batch=prompts_per_batch,
    journal=journal,
)
write_token_file(snakemake.output[0], table)
journal.remove()
log.info("wrote %d responses, %d tokens", table.n_responses, table.n_tokens)

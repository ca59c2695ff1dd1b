"""Rule score_entropy: exact entropy + log-prob of every generated token -> shards/scored.*.h5.

Finished batches are saved under `<output>.partial/`; a rerun after preemption continues there.
"""

import torch

from entroflow.io import load_checked, write_token_file
from entroflow.journal import BatchJournal, journal_folder
from entroflow.lm.models import load_model, load_tokenizer
from entroflow.logs import ProgressLog, setup_logging
from entroflow.tokens.pipeline import score_table, scoring_checks, scoring_key

log = setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
table = load_checked(snakemake.input.generated, require_scores=False)
tokenizer = load_tokenizer(snakemake.input.model)
model = load_model(snakemake.input.model, dtype=snakemake.params.model["dtype"])
scoring = snakemake.params.scoring
temperature = float(snakemake.params.temperature)
settings = {"temperature": temperature, "dtype": snakemake.params.model["dtype"], **scoring}
journal = BatchJournal(
    journal_folder(snakemake.output[0]), scoring_key(table, snakemake.input.model, settings)
)
scored = score_table(
    table,
    model,
    pad_token_id=tokenizer.pad_token_id,
    temperature=temperature,
    max_tokens_per_batch=scoring["max_tokens_per_batch"],
    chunk_rows=scoring["chunk_rows"],
    head_method=scoring["head"],
    progress=ProgressLog("scored", "tokens", log),
    journal=journal,
)
scored.attrs.update(scoring_checks(scored, model, temperature, scoring["verify_responses"]))
log.info("LM head entropy path: %s", scored.attrs["score_head"])
log.info(
    "checks: %s (engine log-probs are after top-p/top-k where those are set)",
    {k: v for k, v in scored.attrs.items() if k.startswith("check_")},
)
write_token_file(snakemake.output[0], scored)
journal.remove()
log.info("wrote %s", snakemake.output[0])

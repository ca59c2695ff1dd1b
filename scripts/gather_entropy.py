"""Rule gather_entropy: shards -> results/{experiment}/entropy.h5, with correctness and vocab."""

from entroflow.io import check_contract, concat_token_tables, load_checked, write_token_file
from entroflow.lm.models import load_tokenizer
from entroflow.logs import setup_logging
from entroflow.provenance import experiment_spec, write_record
from entroflow.tokens.pipeline import add_vocab, mark_correctness, merge_checks

log = setup_logging(snakemake.log[0])
shards = [load_checked(path) for path in snakemake.input.shards]
attrs = {k: v for k, v in shards[0].attrs.items() if k != "shard" and not k.startswith("check_")}
attrs.update(merge_checks(shards))
table = concat_token_tables(shards, attrs={**attrs, "experiment": snakemake.params.experiment})
table = mark_correctness(table)
table = add_vocab(table, load_tokenizer(snakemake.input.model))
check_contract(table, name=snakemake.output[0])
write_token_file(snakemake.output[0], table)
config, name = snakemake.config, snakemake.wildcards.experiment
write_record(snakemake.output[0], config["_config_files"], experiment_spec(config, name))
graded = table["responses/correct"]
log.info("checks: %s", {k: v for k, v in attrs.items() if k.startswith("check_")})
log.info(
    "%d prompts, %d responses, %d tokens; accuracy %.3f",
    table.n_prompts,
    table.n_responses,
    table.n_tokens,
    graded[graded >= 0].mean() if (graded >= 0).any() else float("nan"),
)

"""Rule download_dataset: one dataset entry -> resources/datasets/{dataset}.parquet."""

from contextlib import nullcontext

from entroflow.data.datasets import load_problems, write_parquet_atomic
from entroflow.lm.hub import hub_download
from entroflow.logs import setup_logging
from entroflow.provenance import write_record

log = setup_logging(snakemake.log[0])
name, entry = snakemake.wildcards.dataset, dict(snakemake.params.entry)
log.info("dataset %s: %s", name, entry)
hub = entry["source"] == "hub"
with hub_download("datasets", name, entry["path"]) if hub else nullcontext():
    problems = load_problems(name, entry)
write_parquet_atomic(problems, snakemake.output[0])
write_record(snakemake.output[0], snakemake.config["_config_files"], entry)
log.info("wrote %d problems to %s", len(problems), snakemake.output[0])

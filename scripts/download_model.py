"""Rule download_model (local rule, so it runs where there is network): hub id -> a local folder."""

from entroflow.lm.hub import download_model
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
hub = snakemake.params.hub
log.info("downloading %s (revision %s) to %s", hub["path"], hub["revision"], snakemake.output[0])
download_model(snakemake.wildcards.model, hub["path"], hub["revision"], snakemake.output[0])
log.info("done")

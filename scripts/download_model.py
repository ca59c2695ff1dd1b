"""Rule download_model (local rule, so it runs where there is network): hub id -> a local folder."""

from huggingface_hub import snapshot_download

from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
hub = snakemake.params.hub
log.info("downloading %s (revision %s) to %s", hub["path"], hub["revision"], snakemake.output[0])
snapshot_download(repo_id=hub["path"], revision=hub["revision"], local_dir=snakemake.output[0])
log.info("done")

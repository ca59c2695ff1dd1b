"""Rule plot_training: reward, entropy percentiles and the step probe per step."""

from entroflow.logs import setup_logging
from entroflow.report.plots import training_curves
from entroflow.training.traces import TraceWriter

setup_logging(snakemake.log[0])
rows = TraceWriter(snakemake.params.manifest.rsplit("/", 1)[0]).read_manifest()
training_curves(rows, snakemake.output[0], title=snakemake.wildcards.run)

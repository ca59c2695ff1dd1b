"""Rule summarize_temperature_sweep: the (T_high, T_low) grid as a table and a heat-map."""

from entroflow.eval.evaluation import markdown_table
from entroflow.eval.sweep import sweep_table
from entroflow.io import read_json
from entroflow.logs import setup_logging
from entroflow.report.plots import temperature_sweep_figure

log = setup_logging(snakemake.log[0])
table = sweep_table([read_json(path) for path in snakemake.input]).drop(
    columns=["base_temperature"]
)
table.to_csv(snakemake.output.csv, index=False)
with open(snakemake.output.markdown, "w") as f:
    f.write(markdown_table(table))
temperature_sweep_figure(table, snakemake.output.heatmap, title=snakemake.wildcards.sweep)
log.info("\n%s", markdown_table(table))

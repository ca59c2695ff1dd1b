"""Rule plot_word_clouds."""

import pandas as pd

from entroflow.logs import setup_logging
from entroflow.report.plots import word_cloud

setup_logging(snakemake.log[0])
top = pd.read_csv(snakemake.input.top_tokens, keep_default_na=False)
word_cloud(top, "high", snakemake.output.high, colormap="autumn")
word_cloud(top, "low", snakemake.output.low, colormap="winter")

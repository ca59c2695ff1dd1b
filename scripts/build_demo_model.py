"""Rule build_demo_model: train the tiny demo tokenizer + model on arithmetic CoT (CPU minutes)."""

from entroflow.lm.demo_model import DemoModelConfig, build_demo_model
from entroflow.logs import setup_logging

log = setup_logging(snakemake.log[0])
cfg = DemoModelConfig(**snakemake.params.settings, threads=snakemake.threads)
report = build_demo_model(snakemake.output[0], cfg)
log.info(
    "demo model: %d parameters, vocab %d, greedy accuracy %.3f, %.0f s",
    report["parameters"],
    report["vocab_size"],
    report["greedy_accuracy"],
    report["train_seconds"],
)

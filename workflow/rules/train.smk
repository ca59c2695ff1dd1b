# Small summaries and figures run on the controller (a login node on a cluster), not as jobs.
localrules:
    plot_training,


# Beside its outputs, training writes checkpoint-*/ and, with report_to tensorboard, tensorboard/
# (event files) in results/runs/{run}/. Neither is an output: Snakemake would delete them before a
# rerun, and a rerun resumes from the last checkpoint, adding to the same event folder (a fresh
# start clears both). report_to is read from the config, not a param: trackers trigger no rerun.
# With processes: N > 1 the script runs `accelerate launch --num_processes N` (training.launch),
# one process per GPU, all on one node (Slurm: --gpus=N --nodes=1), on launch/job.json (no output
# either: it is rewritten each time).
rule train_policy:
    input:
        problems=get_run_problems,
        model=get_run_model_dir,
    output:
        run="results/runs/{run}/run.json",
        summary="results/runs/{run}/trace/summary.json",
    log:
        "logs/train_policy/{run}.log",
    benchmark:
        "benchmarks/train_policy/{run}.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: get_train_threads
    resources:
        gpu=get_train_gpus,
        nodes=1,
        runtime=1440,
    params:
        library=library("train_policy"),
        settings=get_train_settings,
        model=get_run_model_settings,
        output_dir="results/runs/{run}",
    script:
        "../../scripts/train_policy.py"


rule plot_training:
    input:
        summary="results/runs/{run}/trace/summary.json",
    output:
        report(
            "results/runs/{run}/figures/training.png",
            caption="../report/training.rst",
            category="Training",
            labels={"run": "{run}", "figure": "training curves"},
        ),
    log:
        "logs/plot_training/{run}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("plot_training"),
        manifest="results/runs/{run}/trace/manifest.jsonl",
    script:
        "../../scripts/plot_training.py"

# Small summaries and figures run on the controller (a login node on a cluster), not as jobs.
localrules:
    summarize_evaluation,


rule evaluate_checkpoint:
    input:
        checkpoint=get_checkpoint_input,
        problems="resources/datasets/{dataset}.parquet",
        model=get_run_model_dir,
    output:
        "results/runs/{run}/eval/{dataset}/checkpoint-{step}.json",
    log:
        "logs/evaluate_checkpoint/{run}.{dataset}.{step}.log",
    benchmark:
        "benchmarks/evaluate_checkpoint/{run}.{dataset}.{step}.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: 2
    resources:
        gpu=1,
        runtime=240,
    params:
        library=library("evaluate_checkpoint"),
        checkpoint=get_checkpoint,
        eval=get_eval_settings,
        model=get_run_model_settings,
        progress="results/runs/{run}/eval/{dataset}/checkpoint-{step}.progress.jsonl",
    script:
        "../../scripts/evaluate_checkpoint.py"


rule summarize_evaluation:
    input:
        get_eval_results,
    output:
        csv=report(
            "results/runs/{run}/eval/table.csv",
            caption="../report/evaluation.rst",
            category="Training",
            labels={
                "run": "{run}",
                "figure": "pass@k per checkpoint and dataset (table)",
            },
        ),
        markdown="results/runs/{run}/eval/table.md",
    log:
        "logs/summarize_evaluation/{run}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("summarize_evaluation"),
        datasets=get_eval_datasets,
        steps=get_eval_steps,
    script:
        "../../scripts/summarize_evaluation.py"

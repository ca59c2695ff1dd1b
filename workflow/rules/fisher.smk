# Small summaries and figures run on the controller (a login node on a cluster), not as jobs.
localrules:
    analyze_fisher_kernel,


rule compute_fisher_kernel:
    input:
        delta_h="results/runs/{run}/delta_h/checkpoint-{step}.h5",
        checkpoint=get_optimizer_checkpoint_input,
        model=get_run_model_dir,
    output:
        "results/runs/{run}/fisher/checkpoint-{step}/kernel.h5",
    # runs.<run>.fisher.logging also writes detailed logs into logs/compute_fisher_kernel/{run}.{step}/
    # (a side artifact beside the log, kept across reruns and rotated by max_files; README).
    log:
        "logs/compute_fisher_kernel/{run}.{step}.log",
    benchmark:
        "benchmarks/compute_fisher_kernel/{run}.{step}.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: 2
    resources:
        gpu=1,
        runtime=480,
    params:
        library=library("compute_fisher_kernel"),
        checkpoint=get_checkpoint,
        settings=get_fisher_settings,
        model=get_run_model_settings,
        gradients=get_gradient_store,
    script:
        "../../scripts/compute_fisher_kernel.py"


rule analyze_fisher_kernel:
    input:
        get_fisher_results,
    output:
        report(
            "results/runs/{run}/figures/fisher_kernel.png",
            caption="../report/fisher.rst",
            category="Fisher kernel",
            labels={"run": "{run}", "figure": "kernel"},
        ),
    log:
        "logs/analyze_fisher_kernel/{run}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("analyze_fisher_kernel"),
    script:
        "../../scripts/analyze_fisher_kernel.py"

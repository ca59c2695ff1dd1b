rule generate_responses:
    input:
        problems=get_problems,
        model=get_model_dir,
    output:
        "results/{experiment}/shards/generated.{shard}-of-{n_shards}.h5",
    log:
        "logs/generate_responses/{experiment}.{shard}-of-{n_shards}.log",
    benchmark:
        "benchmarks/generate_responses/{experiment}.{shard}-of-{n_shards}.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: 2
    resources:
        gpu=get_generation_gpus,
        runtime=720,
    params:
        library=library("generate_responses"),
        model=get_model_settings,
        generation=get_generation_settings,
    script:
        "../../scripts/generate_responses.py"


rule score_entropy:
    input:
        generated="results/{experiment}/shards/generated.{shard}-of-{n_shards}.h5",
        model=get_model_dir,
    output:
        "results/{experiment}/shards/scored.{shard}-of-{n_shards}.h5",
    log:
        "logs/score_entropy/{experiment}.{shard}-of-{n_shards}.log",
    benchmark:
        "benchmarks/score_entropy/{experiment}.{shard}-of-{n_shards}.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: 2
    resources:
        gpu=1,
        runtime=240,
    params:
        library=library("score_entropy"),
        model=get_model_settings,
        temperature=get_temperature,
        scoring=config["scoring"],
    script:
        "../../scripts/score_entropy.py"


rule gather_entropy:
    input:
        shards=get_scored_shards,
        model=get_model_dir,
    output:
        "results/{experiment}/entropy.h5",
    log:
        "logs/gather_entropy/{experiment}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("gather_entropy"),
        experiment="{experiment}",
    script:
        "../../scripts/gather_entropy.py"

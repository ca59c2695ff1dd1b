localrules:
    download_dataset,
    download_model,


rule download_dataset:
    output:
        "resources/datasets/{dataset}.parquet",
    log:
        "logs/download_dataset/{dataset}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("download_dataset"),
        entry=get_dataset_entry,
    script:
        "../../scripts/download_dataset.py"


rule download_model:
    output:
        directory("resources/models/hub/{model}"),
    log:
        "logs/download_model/{model}.log",
    conda:
        "../../envs/entroflow.yaml"
    params:
        library=library("download_model"),
        hub=get_hub_model,
    script:
        "../../scripts/download_model.py"


rule build_demo_model:
    output:
        directory(DEMO_MODEL_DIR),
    log:
        "logs/build_demo_model.log",
    benchmark:
        "benchmarks/build_demo_model.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: 2
    resources:
        runtime=30,
    params:
        library=library("build_demo_model"),
        settings=config["demo_model"],
    script:
        "../../scripts/build_demo_model.py"


rule convert_gguf_model:
    input:
        get_gguf_file,
    output:
        directory("resources/models/gguf/{model}"),
    log:
        "logs/convert_gguf_model/{model}.log",
    benchmark:
        "benchmarks/convert_gguf_model/{model}.tsv"
    conda:
        "../../envs/entroflow.yaml"
    threads: 2
    resources:
        runtime=30,
    params:
        library=library("convert_gguf_model"),
    script:
        "../../scripts/convert_gguf_model.py"

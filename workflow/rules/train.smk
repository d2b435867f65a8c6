rule train:
    input:
        manifest=f"{RESULTS}/split/manifest.csv",
        start_from=get_model_start_checkpoint,
    output:
        checkpoint=f"{RESULTS}/models/{{model}}/model.pt",
        history=f"{RESULTS}/models/{{model}}/history.csv",
        summary=f"{RESULTS}/models/{{model}}/summary.json",
        timing=f"{RESULTS}/models/{{model}}/timing.json",
        model_card=f"{RESULTS}/models/{{model}}/model_card.json",
        mlflow_run=f"{RESULTS}/models/{{model}}/mlflow_run.json",
    log:
        f"{LOGS}/train/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{model}}.tsv"
    conda:
        "../../envs/imgpipe.yaml"
    threads: get_model_threads
    resources:
        gpu=get_train_gpus,
    params:
        settings=get_model_settings,
        image=config["images"],
    script:
        "../scripts/train.py"

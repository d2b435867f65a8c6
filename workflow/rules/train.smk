rule train:
    input:
        manifest=f"{RESULTS}/split/manifest.csv",
        start_from=get_model_checkpoint_inputs,
    output:
        checkpoint=f"{RESULTS}/models/{{model}}/model.pt",
        history=f"{RESULTS}/models/{{model}}/history.csv",
        summary=f"{RESULTS}/models/{{model}}/summary.json",
        mlflow_run=f"{RESULTS}/models/{{model}}/mlflow_run.json",
    params:
        settings=get_model_settings,
        image=config["images"],
    log:
        f"{LOGS}/train/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{model}}.tsv"
    threads: get_train_threads
    resources:
        gpu=1,
    script:
        "../scripts/train.py"

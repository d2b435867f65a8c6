rule evaluate:
    input:
        checkpoint=f"{RESULTS}/models/{{model}}/model.pt",
        summary=f"{RESULTS}/models/{{model}}/summary.json",
        mlflow_run=f"{RESULTS}/models/{{model}}/mlflow_run.json",
        manifest=f"{RESULTS}/split/manifest.csv",
    output:
        metrics=report(
            f"{RESULTS}/eval/{{model}}/metrics.json",
            caption="../report/metrics.rst",
            category="Models",
            subcategory="{model}",
        ),
        confusion_matrix=report(
            f"{RESULTS}/eval/{{model}}/confusion_matrix.png",
            caption="../report/confusion_matrix.rst",
            category="Models",
            subcategory="{model}",
        ),
        roc=report(
            f"{RESULTS}/eval/{{model}}/roc.png",
            caption="../report/roc.rst",
            category="Models",
            subcategory="{model}",
        ),
        predictions=f"{RESULTS}/eval/{{model}}/predictions.csv",
    params:
        device=lambda wildcards: config["models"][wildcards.model]["device"],
    log:
        f"{LOGS}/evaluate/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{{model}}.tsv"
    threads: get_model_threads
    resources:
        gpu=get_model_gpus,
    script:
        "../scripts/evaluate.py"

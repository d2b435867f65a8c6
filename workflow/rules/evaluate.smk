# The model's wildcard has a name of its own: `snakemake --dag` labels a job only with the
# wildcards its parents lack, so under train's `model` it would show no model at all.
rule evaluate:
    input:
        checkpoint=f"{RESULTS}/models/{{evaluated}}/model.pt",
        summary=f"{RESULTS}/models/{{evaluated}}/summary.json",
        timing=f"{RESULTS}/models/{{evaluated}}/timing.json",
        mlflow_run=f"{RESULTS}/models/{{evaluated}}/mlflow_run.json",
        manifest=f"{RESULTS}/split/manifest.csv",
    output:
        metrics=report(
            f"{RESULTS}/eval/{{evaluated}}/metrics.json",
            caption="../report/metrics.rst",
            category="Models",
            subcategory="{evaluated}",
        ),
        confusion_matrix=report(
            f"{RESULTS}/eval/{{evaluated}}/confusion_matrix.png",
            caption="../report/confusion_matrix.rst",
            category="Models",
            subcategory="{evaluated}",
        ),
        roc=report(
            f"{RESULTS}/eval/{{evaluated}}/roc.png",
            caption="../report/roc.rst",
            category="Models",
            subcategory="{evaluated}",
        ),
        reliability=report(
            f"{RESULTS}/eval/{{evaluated}}/reliability.png",
            caption="../report/reliability.rst",
            category="Models",
            subcategory="{evaluated}",
        ),
        embedding=report(
            f"{RESULTS}/eval/{{evaluated}}/embedding.png",
            caption="../report/embedding.rst",
            category="Models",
            subcategory="{evaluated}",
        ),
        confident_errors=report(
            f"{RESULTS}/eval/{{evaluated}}/confident_errors.png",
            caption="../report/confident_errors.rst",
            category="Models",
            subcategory="{evaluated}",
        ),
        predictions=f"{RESULTS}/eval/{{evaluated}}/predictions.csv",
        # The model's folder describes the model completely, test figures included.
        model_metrics=f"{RESULTS}/models/{{evaluated}}/test_metrics.json",
        speed=f"{RESULTS}/eval/{{evaluated}}/speed.json",
    log:
        f"{LOGS}/evaluate/{{evaluated}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{{evaluated}}.tsv"
    conda:
        "../../envs/imgpipe.yaml"
    threads: get_model_threads
    resources:
        gpu=get_model_gpus,
    params:
        batch_size=lambda wildcards: config["models"][model_of(wildcards)]["batch_size"],
    script:
        "../scripts/evaluate.py"

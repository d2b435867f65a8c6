rule report:
    input:
        metrics=expand(f"{RESULTS}/eval/{{model}}/metrics.json", model=MODELS),
        speed=expand(f"{RESULTS}/eval/{{model}}/speed.json", model=MODELS),
        histories=expand(f"{RESULTS}/models/{{model}}/history.csv", model=MODELS),
        predictions=expand(f"{RESULTS}/eval/{{model}}/predictions.csv", model=MODELS),
        plots=expand(
            f"{RESULTS}/eval/{{model}}/{{plot}}",
            model=MODELS,
            plot=[name for name, _ in MODEL_PLOTS],
        ),
        split=f"{RESULTS}/split/manifest.csv",
        dedupe=f"{RESULTS}/dedupe/manifest.csv",
        review=expand(f"{RESULTS}/review/{{cls}}.html", cls=CLASSES),
    output:
        summary=f"{RESULTS}/report/summary.json",
        markdown=f"{RESULTS}/report/report.md",
        html=report(
            f"{RESULTS}/report/report.html",
            caption="../report/report.rst",
            category="Comparison",
        ),
        learning_curves=report(
            f"{RESULTS}/report/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="Comparison",
        ),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCHMARKS}/report.tsv"
    conda:
        "../../envs/imgpipe.yaml"
    params:
        experiment=EXPERIMENT,
        models=MODELS,
        rank_by=config["report"]["rank_by"],
        model_logs=model_logs(),
    script:
        "../scripts/report.py"

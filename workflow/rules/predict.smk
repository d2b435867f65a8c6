# Classify the images of each `predict.folders` entry with the trained models: one job per
# folder and model, "best" being the model the report ranks first.
# (PREDICT_FOLDERS, PREDICT_MODELS and the input functions are in common.smk.)


rule predict:
    input:
        unpack(get_predict_models),
    output:
        csv=f"{RESULTS}/predict/{{folder}}/{{model}}.csv",
        json=f"{RESULTS}/predict/{{folder}}/{{model}}.json",
    log:
        f"{LOGS}/predict/{{folder}}/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/predict/{{folder}}/{{model}}.tsv"
    wildcard_constraints:
        folder="|".join(re.escape(name) for name in PREDICT_FOLDERS) or "(?!)",
        model="|".join(re.escape(name) for name in PREDICT_MODELS),
    conda:
        "../../envs/imgpipe.yaml"
    threads: 1
    resources:
        gpu=get_predict_gpus,
    params:
        folder=get_predict_folder,
        folder_fingerprint=get_predict_folder_fingerprint,
        top_k=config["predict"]["top_k"],
    script:
        "../scripts/predict.py"

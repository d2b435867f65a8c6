# Classify the images of each `predict.folders` entry with the trained models: one job per
# folder and model, "best" being the model the report ranks first.

PREDICT_FOLDERS = sorted(config["predict"]["folders"])
PREDICT_MODELS = ["best"] if config["predict"]["models"] == "best" else config["predict"]["models"]
PREDICT_OUTPUTS = expand(
    f"{RESULTS}/predict/{{folder}}/{{model}}.{{ext}}", folder=PREDICT_FOLDERS, model=PREDICT_MODELS, ext=("csv", "json")
)


def get_predict_models(wildcards):
    """The checkpoint that predicts; for "best", the report's summary names it among all models.
    After evaluation, so the model's folder holds its test figures for the output's header."""
    if config["predict"]["models"] == "best":
        return {
            "summary": f"{RESULTS}/report/summary.json",
            "checkpoints": expand(f"{RESULTS}/models/{{model}}/model.pt", model=MODELS),
        }
    return {
        "checkpoints": [f"{RESULTS}/models/{wildcards.model}/model.pt"],
        "evaluation": f"{RESULTS}/eval/{wildcards.model}/metrics.json",
    }


def get_predict_folder(wildcards):
    return config["predict"]["folders"][wildcards.folder]


def get_predict_folder_fingerprint(wildcards):
    """A content hash of the folder: a new, renamed or edited image reruns the job; a touch does not."""
    return source_fingerprints([{"folder": get_predict_folder(wildcards)}], cache=FILE_HASHES)[0]


def get_predict_gpus(wildcards):
    """1 when a GPU was found at DAG build (the job then claims a free device), else 0."""
    return int(model_uses_gpu("auto", GPUS))


rule predict:
    input:
        unpack(get_predict_models),
    output:
        csv=f"{RESULTS}/predict/{{folder}}/{{model}}.csv",
        json=f"{RESULTS}/predict/{{folder}}/{{model}}.json",
    params:
        folder=get_predict_folder,
        folder_fingerprint=get_predict_folder_fingerprint,
        top_k=config["predict"]["top_k"],
    log:
        f"{LOGS}/predict/{{folder}}/{{model}}.log",
    benchmark:
        f"{BENCHMARKS}/predict/{{folder}}/{{model}}.tsv"
    wildcard_constraints:
        folder="|".join(re.escape(name) for name in PREDICT_FOLDERS) or "(?!)",
        model="|".join(re.escape(name) for name in PREDICT_MODELS),
    threads: 1
    resources:
        gpu=get_predict_gpus,
    script:
        "../scripts/predict.py"

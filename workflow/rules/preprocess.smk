rule preprocess:
    input:
        f"{RESULTS}/dedupe/manifest.csv",
    output:
        images=directory(f"{RESULTS}/images/{{cls}}"),
        manifest=f"{RESULTS}/images/{{cls}}.csv",
    params:
        size=config["images"]["size"],
        color=config["images"]["color"],
        resize=config["images"]["resize"],
        pad_color=config["images"]["pad_color"],
    log:
        f"{LOGS}/preprocess/{{cls}}.log",
    benchmark:
        f"{BENCHMARKS}/preprocess/{{cls}}.tsv"
    script:
        "../scripts/preprocess.py"

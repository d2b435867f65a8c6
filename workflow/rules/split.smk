rule split:
    input:
        images=expand(f"{RESULTS}/images/{{cls}}.csv", cls=CLASSES),
        dedupe=f"{RESULTS}/dedupe/manifest.csv",
    output:
        manifest=f"{RESULTS}/split/manifest.csv",
        sizes=f"{RESULTS}/split/sizes.json",
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCHMARKS}/split.tsv"
    conda:
        "../../envs/imgpipe.yaml"
    params:
        ratios={name: config["split"][name] for name in ("train", "val", "test")},
        seed=config["split"]["seed"],
        classes=CLASSES,
    script:
        "../scripts/split.py"

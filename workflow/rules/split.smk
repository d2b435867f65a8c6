rule split:
    input:
        images=expand(f"{RESULTS}/images/{{cls}}.csv", cls=CLASSES),
        dedupe=f"{RESULTS}/dedupe/manifest.csv",
    output:
        manifest=f"{RESULTS}/split/manifest.csv",
        sizes=f"{RESULTS}/split/sizes.json",
    params:
        ratios={name: config["split"][name] for name in ("train", "val", "test")},
        seed=config["split"]["seed"],
        classes=CLASSES,
    log:
        f"{LOGS}/split.log",
    benchmark:
        f"{BENCHMARKS}/split.tsv"
    script:
        "../scripts/split.py"

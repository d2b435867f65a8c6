rule dedupe:
    input:
        manifests=expand(f"{RESULTS}/raw/{{cls}}.csv", cls=CLASSES),
        exclude=get_exclude_list,
    output:
        manifest=f"{RESULTS}/dedupe/manifest.csv",
        summary=f"{RESULTS}/dedupe/summary.json",
    params:
        near_distance=config["dedupe"]["near_distance"],
        near_action=config["dedupe"]["near_action"],
    log:
        f"{LOGS}/dedupe.log",
    benchmark:
        f"{BENCHMARKS}/dedupe.tsv"
    threads: 2
    script:
        "../scripts/dedupe.py"

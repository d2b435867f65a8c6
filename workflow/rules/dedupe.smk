rule dedupe:
    input:
        manifests=expand(f"{RESULTS}/raw/{{cls}}.csv", cls=CLASSES),
    output:
        manifest=f"{RESULTS}/dedupe/manifest.csv",
        summary=f"{RESULTS}/dedupe/summary.json",
    log:
        f"{LOGS}/dedupe.log",
    benchmark:
        f"{BENCHMARKS}/dedupe.tsv"
    conda:
        "../../envs/imgpipe.yaml"
    threads: 2
    params:
        near_distance=config["dedupe"]["near_distance"],
        near_action=config["dedupe"]["near_action"],
        near_pixel_difference=config["dedupe"]["near_pixel_difference"],
        exclude=sorted(EXCLUSIONS),  # entries only: a comment edit does not rerun this
    script:
        "../scripts/dedupe.py"


# One contact sheet per class (one job: they all read the same table, and a job per class
# would pay Python's start-up once per class).
rule review:
    input:
        manifest=f"{RESULTS}/dedupe/manifest.csv",
    output:
        html=expand(f"{RESULTS}/review/{{cls}}.html", cls=CLASSES),
        grid=expand(f"{RESULTS}/review/{{cls}}.png", cls=CLASSES),
    log:
        f"{LOGS}/review.log",
    benchmark:
        f"{BENCHMARKS}/review.tsv"
    conda:
        "../../envs/imgpipe.yaml"
    params:
        classes=CLASSES,
        exclude_comments=EXCLUSIONS,
    script:
        "../scripts/review.py"

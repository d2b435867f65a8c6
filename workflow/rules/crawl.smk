rule crawl:
    output:
        images=directory(f"{RESULTS}/raw/{{cls}}"),
        manifest=f"{RESULTS}/raw/{{cls}}.csv",
    params:
        sources=get_sources,
        fingerprints=get_source_fingerprints,
    log:
        f"{LOGS}/crawl/{{cls}}.log",
    benchmark:
        f"{BENCHMARKS}/crawl/{{cls}}.tsv"
    script:
        "../scripts/crawl.py"

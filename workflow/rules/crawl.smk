rule crawl:
    output:
        images=directory(f"{RESULTS}/raw/{{cls}}"),
        manifest=f"{RESULTS}/raw/{{cls}}.csv",
        summary=f"{RESULTS}/raw/{{cls}}.json",
    log:
        f"{LOGS}/crawl/{{cls}}.log",
    benchmark:
        f"{BENCHMARKS}/crawl/{{cls}}.tsv"
    conda:
        "../../envs/imgpipe.yaml"
    params:
        sources=get_sources,
        fingerprints=get_source_fingerprints,
        settings=get_crawl_settings,
        # what was fetched, kept across runs outside the outputs: a rerun resumes from it
        store=f"{RESULTS}/crawl-store/{{cls}}",
    script:
        "../scripts/crawl.py"

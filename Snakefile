# imgpipe: crawl -> dedupe -> preprocess -> split -> train -> evaluate -> report
#
#     snakemake --cores 8 --resources gpu=1
#     snakemake --cores 8 --resources gpu=1 --configfile config/examples/<experiment>.yaml

import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from imgpipe.config.schema import ConfigError, check_config_files

min_version("9.0")


# A --configfile replaces the default experiment instead of being merged into it
# (merging would mix the default's classes and models into the other experiment).
if not workflow.overwrite_configfiles:
    # Snakemake's loader says only "not valid JSON or YAML": this names the line and column.
    # (A --configfile is read by Snakemake's command line before this file runs: see README.)
    try:
        check_config_files(
            [path for path in ["config/config.yaml"] if os.path.exists(path)]
        )
    except ConfigError as error:
        raise WorkflowError(str(error)) from None

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/crawl.smk"
include: "workflow/rules/dedupe.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/predict.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
        # Listed too because after a failed model the report is written without it (onerror):
        # the next run must still see that model's result missing and retry it.
        expand(f"{RESULTS}/eval/{{model}}/metrics.json", model=MODELS),
        PREDICT_OUTPUTS,  # empty unless predict.folders names folders


onstart:
    start_tracking()


onsuccess:
    end_tracking(success=True)
    show_verdict()


onerror:
    write_report_after_failure()
    mark_unrun_jobs_incomplete()
    end_tracking(success=False)

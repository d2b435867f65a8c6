"""Glue: every class's contact sheet, HTML and PNG (see imgpipe.data.review)."""

from imgpipe.core.joblog import configure_logging

configure_logging(snakemake.log[0])

from imgpipe.core.manifests import read_dedupe_manifest
from imgpipe.data.review import write_contact_sheet

fates = read_dedupe_manifest(snakemake.input.manifest)
for class_name, html_path, grid_path in zip(snakemake.params.classes, snakemake.output.html, snakemake.output.grid):
    write_contact_sheet(fates, class_name, html_path, grid_path, exclude_comments=snakemake.params.exclude_comments)

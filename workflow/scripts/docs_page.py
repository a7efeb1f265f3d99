"""Snakemake entry point of rule docs_page: the docs page from the rendered tables."""

from pathlib import Path

from quantbench.report.docs_page import PageSection, write_page
from quantbench.util.joblog import job_log

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    sections = [
        PageSection(
            title=s["title"], caption=s["caption"], table_rst=Path(rst).read_text(encoding="utf-8"), note=s["note"]
        )
        for s, rst in zip(smk.params.sections, smk.input.tables)
    ]
    write_page(smk.output[0], smk.params.title, sections, smk.params.notes)

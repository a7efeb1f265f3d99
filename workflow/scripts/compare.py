"""Snakemake entry point of rule compare: one table's reproduced cells against the published ones."""

from quantbench.report.cells import collect_cells, collect_filter_scores
from quantbench.report.compare import write_comparison
from quantbench.report.tables import load_long_csv
from quantbench.util.joblog import job_log

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    table = smk.wildcards.table
    write_comparison(
        load_long_csv(smk.input.published),
        collect_cells(table, smk.input.evals),
        table=table,
        tolerance=smk.params.tolerance,
        csv_path=smk.output.csv,
        md_path=smk.output.md,
        png_path=smk.output.png,
        page_labels=smk.params.page_labels,
        filter_scores=collect_filter_scores(table, smk.input.evals),
        recipe=smk.params.recipe,
        departures=smk.params.departures,
    )

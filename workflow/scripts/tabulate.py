"""Snakemake entry point of rule tabulate: render one table from its result files."""

from pathlib import Path

from quantbench.report.cells import collect_cells
from quantbench.report.tables import TableSpec, write_tables
from quantbench.util.joblog import job_log

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    name = smk.wildcards.table
    spec = TableSpec(
        name=name,
        rows=tuple(map(tuple, smk.params.rows)),
        benchmarks=tuple(smk.params.benchmarks),
        labels=smk.params.labels,
    )
    write_tables(collect_cells(name, smk.input), Path(smk.output.rst).parent, [spec])

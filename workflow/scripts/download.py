"""Snakemake entry point of rule download: fetch one model into results/models/{model}."""

from quantbench.checkpoint.download import ModelSource, fetch_model
from quantbench.util.joblog import job_log

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    fetch_model(ModelSource.from_dict(smk.params.source), smk.output[0])

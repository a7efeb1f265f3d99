"""Snakemake entry point of rule download: fetch one model into results/models/{model}."""

from quantbench.download import fetch_model
from quantbench.joblog import job_log
from quantbench.runconfig import ModelSource

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    fetch_model(ModelSource.from_dict(smk.params.source), smk.output[0])

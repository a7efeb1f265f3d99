"""Snakemake entry point of rule calibrate: tokenize a calibration set with the model's tokenizer."""

from transformers import AutoTokenizer

from quantbench.calibration import save_calibration, tokenize_calibration
from quantbench.joblog import job_log

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    tokenizer = AutoTokenizer.from_pretrained(smk.input.model)
    calibration = tokenize_calibration(
        tokenizer, smk.input.data, smk.params.num_samples, smk.params.max_seq_len, seed=smk.params.seed
    )
    save_calibration(calibration, smk.output[0])

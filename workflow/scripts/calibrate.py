"""Snakemake entry point of rule calibrate: a calibration set through the model's tokenizer (or processor, image-text sets)."""

from quantbench.calibration import calibrate_model, save_calibration
from quantbench.joblog import job_log

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    calibration = calibrate_model(
        smk.input.model, smk.input.data, smk.params.num_samples, smk.params.max_seq_len, seed=smk.params.seed
    )
    save_calibration(calibration, smk.output[0])

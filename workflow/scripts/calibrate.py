"""Snakemake entry point of rule calibrate: a calibration set (JSONL or Hub split) through the model's tokenizer or processor."""

from quantbench.calibration.hubsets import HubImageSet
from quantbench.calibration.samples import calibrate_model, save_calibration
from quantbench.calibration.stream import StreamSpec
from quantbench.util.joblog import job_log

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    source = HubImageSet.from_dict(smk.params.hub) if smk.params.hub else smk.input.data
    calibration = calibrate_model(
        smk.input.model,
        source,
        smk.params.num_samples,
        smk.params.max_seq_len,
        seed=smk.params.seed,
        stream=StreamSpec.from_dict(smk.params.stream),
    )
    save_calibration(calibration, smk.output[0])

"""Snakemake entry point of rule quantize: one compressed-tensors checkpoint for (model, scheme)."""

from quantbench.quant.quantize import quantize_checkpoint
from quantbench.quant.schemes import scheme_from_dict
from quantbench.run.config import preflight_of
from quantbench.util.joblog import job_log

smk = snakemake  # noqa: F821 - injected by Snakemake's script directive

with job_log(smk.log[0]):
    quantize_checkpoint(
        smk.input.model,
        scheme_from_dict(smk.params.scheme),
        smk.output[0],
        calibration=smk.input.calib[0] if smk.input.calib else None,
        device=smk.params.device,
        seed=smk.params.seed,
        headroom=preflight_of(smk.config).headroom,  # not a param: editing it reruns nothing
    )

# quantbench: download -> calibrate -> quantize -> evaluate -> tabulate, per (model, scheme, benchmark).
#
#   snakemake -j 2                                  # the embedded offline demo (config/config.yaml)
#   snakemake -j 8 --configfile config/seed.yaml    # the full published matrix
#
# Rules live in rules/*.smk, thin entry points in workflow/scripts/, everything else in src/quantbench/.

import os

from snakemake.utils import min_version, validate

min_version("9.0")

# envs/*.yaml (--software-deployment-method conda) install quantbench from this checkout, which pip finds
# through this variable (set here, for the conda and pip processes Snakemake starts; nothing reads it back)
os.environ.update(QUANTBENCH_ROOT=workflow.basedir)


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/calibrate.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/tabulate.smk"
include: "rules/report.smk"


rule all:
    input:
        all_tables(),
        report_outputs(),
    default_target: True

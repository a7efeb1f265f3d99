# quantbench: download -> calibrate -> quantize -> evaluate -> tabulate, per (model, scheme, benchmark).
#
#   snakemake -j 2                                  # the embedded offline demo (config/config.yaml)
#   snakemake -j 8 --configfile config/seed.yaml    # the full published matrix
#
# Rules live in rules/*.smk, thin entry points in workflow/scripts/, everything else in src/quantbench/.

from snakemake.utils import min_version, validate

min_version("9.0")


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

# download: a local model directory is copied, a Hub model snapshotted at its pinned revision.


rule download:
    output:
        directory(f"{R}/models/{{model}}"),
    params:
        source=lambda w: RUN.models[w.model].source.to_dict(),
    log:
        "logs/download/{model}.log",
    localrule: True
    retries: 2
    conda:
        "../envs/quantbench.yaml"
    script:
        "../workflow/scripts/download.py"

# quantize: one compressed-tensors checkpoint per (model, scheme); scheme parameters are params, so
# editing one scheme reruns only its own checkpoints and what depends on them.


rule quantize:
    input:
        model=f"{R}/models/{{model}}",
        calib=lambda w: calib_file(w.model, w.scheme),
    output:
        directory(f"{R}/quantized/{{model}}/{{scheme}}"),
    params:
        scheme=lambda w: RUN.schemes[w.scheme].to_dict(),
        device=RUN.quantization.device,
        seed=RUN.quantization.seed,
    log:
        "logs/quantize/{model}/{scheme}.log",
    threads: threads_of("quantize")
    resources:
        **resources_of("quantize"),
    benchmark:
        f"{R}/benchmarks/quantize/{{model}}/{{scheme}}.tsv"
    conda:
        "../envs/quantbench.yaml"
    script:
        "../workflow/scripts/quantize.py"

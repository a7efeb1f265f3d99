# calibrate: N samples x L tokens of a calibration set through the model's tokenizer (image-text sets: its processor).


rule calibrate:
    input:
        model=f"{R}/models/{{model}}",
        data=lambda w: str(RUN.calibration_sets[w.calibset].path),
    output:
        f"{R}/calib/{{model}}/{{calibset}}.safetensors",
    params:
        num_samples=lambda w: RUN.calibration_sets[w.calibset].num_samples,
        max_seq_len=lambda w: RUN.calibration_sets[w.calibset].max_seq_len,
        seed=lambda w: RUN.calibration_sets[w.calibset].seed,
    log:
        "logs/calibrate/{model}/{calibset}.log",
    resources:
        **resources_of("calibrate"),
    script:
        "../workflow/scripts/calibrate.py"

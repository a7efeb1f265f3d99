# calibrate: N samples x L tokens of a calibration set through the model's tokenizer (image-text sets: its processor),
# records taken, rendered and padded as the set's stream says (selection, format, padding).
# A JSONL set's inputs are the file and the images its records name; a Hub set's identity (dataset, split,
# revision, columns) is a param, so changing either reruns calibration.


rule calibrate:
    input:
        model=f"{R}/models/{{model}}",
        data=lambda w: str(path) if (path := RUN.calibration_sets[w.calibset].path) else [],
        images=lambda w: [str(image) for image in RUN.calibration_sets[w.calibset].images],
    output:
        f"{R}/calib/{{model}}/{{calibset}}.safetensors",
    params:
        hub=lambda w: (hub.to_dict() if (hub := RUN.calibration_sets[w.calibset].hub) else {}),
        num_samples=lambda w: RUN.calibration_sets[w.calibset].num_samples,
        max_seq_len=lambda w: RUN.calibration_sets[w.calibset].max_seq_len,
        seed=lambda w: RUN.calibration_sets[w.calibset].seed,
        stream=lambda w: RUN.calibration_sets[w.calibset].stream.to_dict(),
    log:
        "logs/calibrate/{model}/{calibset}.log",
    threads: threads_of("calibrate")
    resources:
        **resources_of("calibrate"),
    conda:
        "../envs/quantbench.yaml"
    script:
        "../workflow/scripts/calibrate.py"

# evaluate: one lm-eval (or perplexity) job per (model, scheme, benchmark), writing one result JSON.


rule evaluate:
    input:
        model=lambda w: checkpoint_dir(w.model, w.scheme),
    output:
        f"{R}/evals/{{model}}/{{scheme}}/{{benchmark}}.json",
    params:
        spec=lambda w: BENCHMARKS[w.benchmark].with_overrides(eval_overrides(w.benchmark)[1]).to_dict(),
        limit=lambda w: eval_overrides(w.benchmark)[0],
        source=RUN.evaluation.get("source", "local"),
        data_dir=RUN.evaluation.get("data_dir", "resources/data"),
        backend=lambda w: eval_backend(w),
        benchmarks_file=config.get("benchmarks_file", "config/benchmarks.yaml"),
    log:
        "logs/evaluate/{model}/{scheme}/{benchmark}.log",
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    benchmark:
        f"{R}/benchmarks/evaluate/{{model}}/{{scheme}}/{{benchmark}}.tsv"
    conda:
        "../envs/vllm.yaml" if RUN.evaluation.get("backend", {}).get("name") == "vllm" else "../envs/quantbench.yaml"
    script:
        "../workflow/scripts/evaluate.py"

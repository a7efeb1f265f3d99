# evaluate: one lm-eval (or perplexity) job per (model, scheme, benchmark), writing one result JSON. vLLM spreads
# the model over the GPUs the job is sized for (tensor parallelism, from the sizing rule itself).


rule evaluate:
    input:
        model=lambda w: checkpoint_dir(w.model, w.scheme),
    output:
        f"{R}/evals/{{model}}/{{scheme}}/{{benchmark}}.json",
    params:
        spec=lambda w: RUN.benchmark(w.benchmark).to_dict(),
        limit=lambda w: RUN.evaluation.limit_of(w.benchmark),
        source=RUN.evaluation.source,
        data_dir=str(RUN.evaluation.data_dir),
        backend=eval_backend,
        benchmarks_file=str(RUN.benchmarks_file),
    log:
        "logs/evaluate/{model}/{scheme}/{benchmark}.log",
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    benchmark:
        f"{R}/benchmarks/evaluate/{{model}}/{{scheme}}/{{benchmark}}.tsv"
    conda:
        eval_env()
    script:
        "../workflow/scripts/evaluate.py"

# evaluate: one lm-eval (or perplexity) job per (model, scheme, benchmark), writing one result JSON.


def eval_overrides(benchmark):
    """This run's settings for ``benchmark``: (limit, spec overrides) from config evaluation.overrides."""
    overrides = dict(RUN.evaluation.get("overrides", {}).get(benchmark, {}))
    return overrides.pop("limit", RUN.evaluation.get("limit")), overrides


def eval_backend(w):
    """The run's evaluation backend; vLLM spreads the model over the GPUs the job is sized for (tensor
    parallelism; computed by the sizing rule itself, not read back from resources, which is far cheaper).
    A CPU job is sized for no GPU and runs vLLM's CPU build unsplit."""
    backend = dict(RUN.evaluation.get("backend", {}))
    if backend.get("name") == "vllm":
        backend["tensor_parallel_size"] = max(1, sized_resources("evaluate", w).gpu)
    return backend


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
    script:
        "../workflow/scripts/evaluate.py"

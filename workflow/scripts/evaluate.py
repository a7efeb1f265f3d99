"""Snakemake entry point of rule evaluate: score one (model, scheme) on one benchmark.

The body runs only as the main program: vLLM starts its engine in a process made by spawn, which imports
this script again (as ``__mp_main__``, without Snakemake's ``snakemake`` object)."""

from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import benchmark_from_dict
from quantbench.evaluate.runner import evaluate_benchmark
from quantbench.run.config import preflight_of
from quantbench.util.joblog import job_log

if __name__ == "__main__":
    smk = snakemake  # noqa: F821 - injected by Snakemake's script directive
    with job_log(smk.log[0]):
        evaluate_benchmark(
            smk.input.model,
            benchmark_from_dict(smk.params.spec),
            out_path=smk.output[0],
            model_name=smk.wildcards.model,
            scheme_name=smk.wildcards.scheme,
            source=smk.params.source,
            data_dir=smk.params.data_dir,
            backend=Backend(**smk.params.backend),
            limit=smk.params.limit,
            benchmarks_file=smk.params.benchmarks_file,
            headroom=preflight_of(smk.config).headroom,  # not a param: editing it reruns nothing
        )

# Shared state of the workflow: the run config (quantbench.run.config, the one reader of `config`), output
# paths and input functions. Rules read the config only through RUN.

from snakemake.exceptions import WorkflowError

from quantbench.run.config import load_run_config
from quantbench.run.sizing import runtime_for_attempt
from quantbench.util.errors import QuantbenchError

try:
    RUN = load_run_config(config, base_dir=".")
except QuantbenchError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None

R = str(RUN.results)
NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]*"


wildcard_constraints:
    model=NAME,
    scheme=NAME,
    benchmark=NAME,
    calibset=NAME,
    table=NAME,


def model_dir(model):
    return f"{R}/models/{model}"


def checkpoint_dir(model, scheme):
    """The directory evaluated for (model, scheme): the original model for the baseline."""
    if RUN.schemes[scheme].is_baseline:
        return model_dir(model)
    return f"{R}/quantized/{model}/{scheme}"


def calib_file(model, scheme):
    calib = RUN.calibration_of(model, scheme)
    return [] if calib is None else [f"{R}/calib/{model}/{calib.name}.safetensors"]


def eval_file(model, scheme, benchmark):
    return f"{R}/evals/{model}/{scheme}/{benchmark}.json"


def table_outputs(table, folder=""):
    return [f"{R}/tables/{folder}{table}.{ext}" for ext in ("rst", "csv", "md")]


def all_tables():
    """Every table's files, and the as-published rendering of tables whose page labels columns differently."""
    return [path for table in RUN.tables for path in table_outputs(table.name)] + [
        path for table in RUN.tables if table.published_labels for path in table_outputs(table.name, "as-published/")
    ]


def evals_of_table(name):
    return [eval_file(m, s, b) for m, s, b in RUN.table_cells(RUN.table(name))]


def resources_of(step):
    """A step's Snakemake resources (gpu, mem_mb, runtime; RUN.job_resources), functions of the job's wildcards;
    a retried job (the profile's retries) gets attempt times the wall time."""

    def sized(w):
        return RUN.job_resources(step, w.model, w.get("scheme"), w.get("benchmark"))

    return {
        "gpu": lambda w: sized(w).gpu,
        "mem_mb": lambda w: sized(w).mem_mb,
        "runtime": lambda w, attempt: runtime_for_attempt(sized(w).runtime, attempt),
    }


def threads_of(step):
    """A step's CPU threads (a function of the job's wildcards; RUN.threads_of)."""
    return lambda w: RUN.threads_of(step, w.model, w.get("scheme"), w.get("benchmark"))


def report_outputs():
    """The comparison report per table (when `compare` is configured) and the docs page (when `docs` is)."""
    outputs = []
    if RUN.compare:
        outputs += [f"{R}/compare/{t.name}.{ext}" for t in RUN.tables for ext in ("csv", "md", "png")]
    if RUN.docs:
        outputs.append(str(RUN.docs.path))
    return outputs


# Input and param functions of the rules (rules/*.smk hold rules only).


def eval_backend(w):
    """The run's evaluation backend for this job; vLLM spreads the model over the GPUs the job is sized for
    (tensor parallelism, from the sizing rule itself)."""
    return RUN.evaluation.backend_params(RUN.job_resources("evaluate", w.model, w.scheme, w.benchmark).gpu)


def eval_env():
    """The evaluate jobs' conda environment (--sdm conda): vLLM's for a vLLM backend, else quantbench's."""
    return "../envs/vllm.yaml" if RUN.evaluation.backend.name == "vllm" else "../envs/quantbench.yaml"


def tabulate_params(as_published):
    """The params of a tabulate rule: a table's rows, benchmarks and column labels (the page's, if as published)."""
    return dict(
        rows=lambda w: [list(row) for row in RUN.table_rows(RUN.table(w.table))],
        benchmarks=lambda w: list(RUN.table(w.table).benchmarks),
        labels=lambda w: RUN.table(w.table).headers(as_published=as_published),
    )


def compared(ext):
    """One comparison output of table {table}, flagged for `snakemake --report`."""
    return report(
        f"{R}/compare/{{table}}.{ext}",
        caption="../workflow/report/compare.rst",
        category="Comparison with the published page",
        subcategory="{table}",
    )

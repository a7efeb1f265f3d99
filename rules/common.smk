# Shared state of the workflow: the cross-checked run config, output paths and input functions.

from pathlib import Path

from snakemake.exceptions import WorkflowError

from quantbench.util.errors import QuantbenchError
from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.run.sizing import Hardware, eval_rates, job_resources, load_workloads, runtime_for_attempt
from quantbench.run.config import load_run_config

try:
    BENCHMARKS = load_benchmarks(config.get("benchmarks_file", "config/benchmarks.yaml"))
    RUN = load_run_config(config, base_dir=".", benchmarks=BENCHMARKS)
    HARDWARE = Hardware(**config.get("hardware", {}))
    WORKLOADS = load_workloads(config.get("benchmarks_file", "config/benchmarks.yaml"))
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


DEVICES = {
    "calibrate": "cpu",
    "quantize": config.get("quantization", {}).get("device", "auto"),
    "evaluate": RUN.evaluation.get("backend", {}).get("device", "cpu"),  # the hf backend's default
}


def sized_resources(step, w):
    """The quantbench.run.sizing sizing of one job of ``step`` (wildcards ``w``), from its model's params_b
    (and for evaluate, the benchmark's workload at the configured backend's measured rates)."""
    scheme = w.get("scheme")
    benchmark = w.get("benchmark")
    backend = RUN.evaluation.get("backend", {})
    return job_resources(
        step,
        RUN.models[w.model].params_b,
        scheme=RUN.schemes[scheme] if scheme else None,
        device=DEVICES[step],
        hardware=HARDWARE,
        model=w.model,
        workload=WORKLOADS.get(benchmark),
        rates=eval_rates(BENCHMARKS.get(benchmark)),
        backend=backend.get("name", "hf"),
        batch=backend.get("batch_size"),
    )


def resources_of(step):
    """A step's Snakemake resources (gpu, mem_mb, runtime), functions of the job's wildcards; a retried job
    (the profile's retries) gets attempt times the wall time."""
    return {
        "gpu": lambda w: sized_resources(step, w).gpu,
        "mem_mb": lambda w: sized_resources(step, w).mem_mb,
        "runtime": lambda w, attempt: runtime_for_attempt(sized_resources(step, w).runtime, attempt),
    }


def threads_of(step):
    """A step's CPU threads (a function of the job's wildcards): the sizing rule's, or the hf evaluation
    backend's configured threads, which is all such an evaluation then uses."""
    backend = RUN.evaluation.get("backend", {})
    configured = backend.get("threads") if step == "evaluate" and backend.get("name", "hf") == "hf" else None
    return lambda w: configured or sized_resources(step, w).threads


def report_outputs():
    """The comparison report per table (when `compare` is configured) and the docs page (when `docs` is)."""
    outputs = []
    if "compare" in config:
        outputs += [f"{R}/compare/{t.name}.{ext}" for t in RUN.tables for ext in ("csv", "md", "png")]
    if "docs" in config:
        outputs.append(config["docs"]["path"])
    return outputs

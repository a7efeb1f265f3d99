"""The workflow's run configuration, the one reader of the config: typed sections, cross-checked.

:func:`load_run_config` turns the config mapping into a :class:`RunConfig`, whose sections the rules, the
workflow scripts and the tests read (``RUN.evaluation.backend.device``, ``RUN.quantization.seed``): models,
calibration sets, tables, ``quantization``, ``evaluation``, ``hardware``, ``preflight``, ``compare``, ``docs``,
and the schemes and benchmarks of the files the config names. Every default lives here, in the section's
dataclass (or in the library dataclass a section is: :class:`~quantbench.evaluate.backend.Backend`,
:class:`~quantbench.run.sizing.Hardware`, :class:`~quantbench.calibration.stream.StreamSpec`); the JSON
schema (``workflow/schemas/config.schema.yaml``) checks shapes and types only.

Beyond the schema, this module checks that every scheme, benchmark, calibration set and model a key refers
to exists, that each model and each calibration set has exactly one source (a JSONL, whose images must
exist, or a Hub dataset split with its column names), that every scheme needing calibration has a
calibration set (one per model, or one per scheme), and that benchmark data is present.
``scheme_overrides`` change fields of the schemes file's schemes for this run (how config/seed.yaml selects
the published recipe's behaviour where it departs from quantbench's; docs/fidelity.md). It takes a plain
dict, so the workflow, the CLI and the tests share one reading of the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantbench.calibration.hubsets import HubImageSet
from quantbench.calibration.stream import StreamSpec
from quantbench.checkpoint.download import ModelSource
from quantbench.checkpoint.preflight import GIB, Headroom
from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import BenchmarkSpec, load_benchmarks
from quantbench.quant.schemes import Scheme, load_schemes
from quantbench.run.sizing import EvalWorkload, Hardware, JobResources, eval_rates, job_resources, load_workloads
from quantbench.util.errors import QuantbenchError
from quantbench.util.jsonl import iter_jsonl
from quantbench.util.specfile import build_spec

# Defaults of the top-level keys (relative paths resolve against the run's base directory, ``results`` against
# the working directory Snakemake runs in)
RESULTS = "results"
SCHEMES_FILE = "config/schemes.yaml"
BENCHMARKS_FILE = "config/benchmarks.yaml"
EVAL_SOURCES = ("local", "hub")


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration set: a JSONL file (and the images its records name) or a Hub split, how many samples of how
    many tokens, and how records become samples (:class:`~quantbench.calibration.stream.StreamSpec`)."""

    name: str
    num_samples: int = 128
    max_seq_len: int = 2048
    seed: int = 0
    path: Path | None = None
    images: tuple[Path, ...] = ()
    hub: HubImageSet | None = None
    stream: StreamSpec = StreamSpec()

    @property
    def source(self) -> Path | HubImageSet:
        """What calibration reads: the JSONL file or the Hub set."""
        return self.hub if self.hub is not None else self.path


@dataclass(frozen=True)
class ModelEntry:
    """One model row group: its source, the schemes it runs and the calibration set of each scheme that needs one."""

    name: str
    source: ModelSource
    schemes: tuple[str, ...]
    calibration: Mapping[str, str] = field(default_factory=dict)
    params_b: float | None = None
    skip: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class TableConfig:
    """One rendered table: which models, schemes and benchmark columns, in order.

    ``labels``: a column's header where it is not the benchmark's name. ``published_labels``: the header a
    published page prints for a benchmark where that differs (the table is then also rendered as published).
    """

    name: str
    models: tuple[str, ...]
    benchmarks: tuple[str, ...]
    caption: str = ""
    schemes: tuple[str, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    published_labels: Mapping[str, str] = field(default_factory=dict)

    def headers(self, *, as_published: bool = False) -> dict[str, str]:
        """Each benchmark's column header, in the corrected rendering or as published."""
        own = {b: self.labels.get(b, b) for b in self.benchmarks}
        return {b: self.published_labels.get(b, own[b]) for b in self.benchmarks} if as_published else own


@dataclass(frozen=True)
class QuantizationConfig:
    """``quantization:``: the device quantize jobs compute on (``auto``, ``cpu``, ``cuda``, ``cuda:N``; ``auto``
    is the first GPU when there is one) and the seed they set."""

    device: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class EvaluationConfig:
    """``evaluation:``: the data source (``local``: quantbench's tasks over the JSONL files in ``data_dir``;
    ``hub``: lm-eval's built-in tasks), the items scored per task (``limit``; None: all), the backend, and per
    benchmark the run's overrides of its spec (``limit`` among them).

    ``backend_keys`` are the backend keys the config sets: they alone are the evaluate jobs' ``backend``
    param (:meth:`backend_params`), so that a default of :class:`Backend` is no param and results made
    before stay current.
    """

    source: str = "local"
    data_dir: Path = Path("resources/data")
    limit: int | None = None
    backend: Backend = Backend()
    backend_keys: tuple[str, ...] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in EVAL_SOURCES:
            raise QuantbenchError(f"evaluation.source: {self.source!r} is not one of {', '.join(EVAL_SOURCES)}")

    def limit_of(self, benchmark: str) -> int | None:
        """Items scored per task of ``benchmark``: its override's ``limit``, else the run's."""
        return self.overrides.get(benchmark, {}).get("limit", self.limit)

    def overrides_of(self, benchmark: str) -> dict[str, Any]:
        """The run's overrides of ``benchmark``'s spec (:meth:`BenchmarkSpec.with_overrides`), ``limit`` aside."""
        return {key: value for key, value in self.overrides.get(benchmark, {}).items() if key != "limit"}

    def backend_params(self, gpus: int) -> dict[str, Any]:
        """The backend as the evaluate rule's param, for a job on ``gpus`` GPUs: the keys the config sets, and for
        vLLM the tensor-parallel size (the job's GPUs; a CPU job, sized for none, runs vLLM's CPU build unsplit)."""
        params = {key: getattr(self.backend, key) for key in self.backend_keys}
        if self.backend.name == "vllm":
            params["tensor_parallel_size"] = max(1, gpus)
        return params


@dataclass(frozen=True)
class PreflightConfig:
    """``preflight:``: what quantize and evaluate jobs leave free beyond their need, in GB
    (:mod:`quantbench.checkpoint.preflight`)."""

    disk_headroom_gb: float = 0.0
    memory_headroom_gb: float = 0.0

    @property
    def headroom(self) -> Headroom:
        """The same in bytes, as the preflight checks take it."""
        return Headroom(disk_bytes=int(self.disk_headroom_gb * GIB), memory_bytes=int(self.memory_headroom_gb * GIB))


@dataclass(frozen=True)
class CompareConfig:
    """``compare:``: the published cells (a long-format CSV), the tolerance beyond which a difference is flagged
    (points), and the published recipe whose departures the report lists (:mod:`quantbench.run.recipe`)."""

    published: Path
    tolerance: float = 1.0
    recipe: Path | None = None


@dataclass(frozen=True)
class DocsConfig:
    """``docs:``: the docs page regenerated from the tables (a MyST Markdown path), its title and closing notes."""

    path: Path
    title: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    """A validated run configuration (module docstring)."""

    results: Path
    benchmarks_file: Path
    schemes: Mapping[str, Scheme]
    benchmarks: Mapping[str, BenchmarkSpec]
    workloads: Mapping[str, EvalWorkload]
    models: Mapping[str, ModelEntry]
    calibration_sets: Mapping[str, CalibrationSet]
    tables: tuple[TableConfig, ...]
    quantization: QuantizationConfig = QuantizationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    hardware: Hardware = Hardware()
    preflight: PreflightConfig = PreflightConfig()
    compare: CompareConfig | None = None
    docs: DocsConfig | None = None

    def table(self, name: str) -> TableConfig:
        """The table called ``name``."""
        for table in self.tables:
            if table.name == name:
                return table
        raise QuantbenchError(f"no table named {name!r}; tables: {', '.join(t.name for t in self.tables)}")

    def table_rows(self, table: TableConfig) -> tuple[tuple[str, str], ...]:
        """The (model, scheme) rows of ``table``: its schemes (or each model's own) that the model runs."""
        rows = []
        for model in table.models:
            entry = self.models[model]
            rows.extend((model, s) for s in (table.schemes or entry.schemes) if s in entry.schemes)
        return tuple(rows)

    def table_cells(self, table: TableConfig) -> list[tuple[str, str, str]]:
        """The (model, scheme, benchmark) cells of ``table`` that run (its rows minus the models' ``skip``)."""
        return [
            (model, scheme, bench)
            for model, scheme in self.table_rows(table)
            for bench in table.benchmarks
            if (scheme, bench) not in self.models[model].skip
        ]

    def evaluations(self) -> list[tuple[str, str, str]]:
        """Every (model, scheme, benchmark) job of every table, once, in table order."""
        return list(dict.fromkeys(cell for table in self.tables for cell in self.table_cells(table)))

    def calibration_of(self, model: str, scheme: str) -> CalibrationSet | None:
        """The calibration set (model, scheme) needs, or None for data-free schemes."""
        if not self.schemes[scheme].needs_calibration:
            return None
        return self.calibration_sets[self.models[model].calibration[scheme]]  # presence checked at load

    def device_of(self, step: str) -> str:
        """Where jobs of ``step`` run, as configured: calibrate on the CPU, quantize on ``quantization.device``,
        evaluate on the backend's device."""
        return {"calibrate": "cpu", "quantize": self.quantization.device, "evaluate": self.evaluation.backend.device}[
            step
        ]

    def job_resources(
        self, step: str, model: str, scheme: str | None = None, benchmark: str | None = None
    ) -> JobResources:
        """The :mod:`quantbench.run.sizing` request of one job of ``step``: from the model's ``params_b``, the scheme,
        and for evaluate the benchmark's workload at the measured rates of the configured backend."""
        backend = self.evaluation.backend
        return job_resources(
            step,
            self.models[model].params_b,
            scheme=self.schemes[scheme] if scheme else None,
            device=self.device_of(step),
            hardware=self.hardware,
            model=model,
            workload=self.workloads.get(benchmark),
            rates=eval_rates(self.benchmarks.get(benchmark)),
            backend=backend.name,
            batch=backend.batch_size,
        )

    def threads_of(self, step: str, model: str, scheme: str | None = None, benchmark: str | None = None) -> int:
        """A job's CPU threads: the sizing rule's, or the hf evaluation backend's configured threads, which is all
        such an evaluation then uses."""
        backend = self.evaluation.backend
        configured = backend.threads if step == "evaluate" and backend.name == "hf" else None
        return configured or self.job_resources(step, model, scheme, benchmark).threads

    def benchmark(self, name: str) -> BenchmarkSpec:
        """The benchmark ``name`` with this run's overrides of its spec applied."""
        return self.benchmarks[name].with_overrides(self.evaluation.overrides_of(name))


def _source(name: str, raw: Mapping[str, Any], base: Path) -> ModelSource:
    has_path, has_hub = "path" in raw, "hub" in raw
    if has_path == has_hub:
        raise QuantbenchError(
            f"models.{name}: give exactly one source, 'path: <local dir>' or 'hub: {{repo: <id>, revision: <sha>}}'"
        )
    if has_path:
        return ModelSource(path=base / raw["path"])
    hub = raw["hub"]
    return ModelSource(repo=hub["repo"], revision=hub.get("revision"))


def _calibration_set(name: str, raw: Mapping[str, Any], base: Path) -> CalibrationSet:
    key = f"calibration_sets.{name}"
    if ("path" in raw) == ("hub" in raw):
        raise QuantbenchError(
            f"{key}: give exactly one source, 'path: <JSONL>' or 'hub: {{dataset, split, revision, image, question, "
            "answer}' (a Hugging Face dataset split and its column names)"
        )
    size = {k: int(raw[k]) for k in ("num_samples", "max_seq_len", "seed") if k in raw}
    size["stream"] = StreamSpec.from_dict(raw, key)
    if "hub" in raw:
        return CalibrationSet(name=name, hub=HubImageSet.from_dict(raw["hub"], f"{key}.hub"), **size)
    path = base / raw["path"]
    if not path.is_file():
        raise QuantbenchError(f"{key}.path: {path} does not exist")
    return CalibrationSet(name=name, path=path, images=_record_images(path, key), **size)


def _record_images(path: Path, key: str) -> tuple[Path, ...]:
    """The image files the records of the JSONL ``path`` name (relative to its folder), each once, checked to exist."""
    try:
        images = [
            path.parent / record["image"] for _, record in iter_jsonl(path, "calibration file") if "image" in record
        ]
    except QuantbenchError as exc:
        raise QuantbenchError(f"{key}.path: {exc}") from None
    missing = [str(image) for image in dict.fromkeys(images) if not image.is_file()]
    if missing:
        raise QuantbenchError(f"{key}.path: {path} names image(s) that do not exist: {', '.join(missing[:5])}")
    return tuple(dict.fromkeys(images))


def _model_calibration(
    key: str,
    raw: Any,
    schemes: tuple[str, ...],
    all_schemes: Mapping[str, Scheme],
    calib_sets: Mapping[str, CalibrationSet],
) -> dict[str, str]:
    """``models.<m>.calibration`` as {scheme: set} for the model's schemes that need data.

    One set name serves every such scheme; a mapping names a set per scheme (the published recipe took
    different sample counts and lengths for different schemes of one model).
    """
    needing = [s for s in schemes if all_schemes[s].needs_calibration]
    if raw is None:
        if needing:
            model = key.removesuffix(".calibration")
            raise QuantbenchError(f"{model}: schemes {needing} need calibration data; set {key}")
        return {}
    if isinstance(raw, str):
        _check_known("calibration set", key, [raw], calib_sets)
        return dict.fromkeys(needing, raw)
    _check_known("scheme", f"{key} (a mapping of scheme to calibration set)", raw, schemes)
    _check_known("calibration set", key, raw.values(), calib_sets)
    missing = [s for s in needing if s not in raw]
    if missing:
        raise QuantbenchError(f"{key}: schemes {missing} need calibration data; name their calibration set there")
    return {s: raw[s] for s in needing}


def _check_known(kind: str, key: str, names: Any, known: Mapping[str, Any] | tuple[str, ...]) -> None:
    for name in names:
        if name not in known:
            raise QuantbenchError(f"{key}: unknown {kind} {name!r}; known {kind}s: {', '.join(known)}")


def _section(cls: type, config: Mapping[str, Any], key: str) -> Any:
    """The typed section ``key`` of ``config`` (its dataclass's defaults where the config is silent)."""
    return build_spec(cls, config.get(key) or {}, key)


def _evaluation(raw: Mapping[str, Any], base: Path) -> EvaluationConfig:
    backend = raw.get("backend") or {}
    typed = {"backend": build_spec(Backend, backend, "evaluation.backend"), "backend_keys": tuple(backend)}
    evaluation = build_spec(EvaluationConfig, {**raw, **typed}, "evaluation")
    return replace(evaluation, data_dir=base / evaluation.data_dir)


def preflight_of(config: Mapping[str, Any]) -> PreflightConfig:
    """The ``preflight`` section of a config mapping (a job script reads it from Snakemake's config: it is no
    param, so editing it reruns nothing)."""
    return _section(PreflightConfig, config, "preflight")


def load_run_config(config: Mapping[str, Any], *, base_dir: str | Path = ".") -> RunConfig:
    """Read and cross-check a (schema-validated) config mapping; relative paths resolve against ``base_dir``.

    The schemes and benchmarks come from the files the config names (``schemes_file``, ``benchmarks_file``).
    With the ``local`` data source, every benchmark a table uses must have its data files under
    ``evaluation.data_dir``.
    """
    base = Path(base_dir)
    schemes = load_schemes(base / config.get("schemes_file", SCHEMES_FILE), config.get("scheme_overrides"))
    benchmarks_file = base / config.get("benchmarks_file", BENCHMARKS_FILE)
    benchmarks = load_benchmarks(benchmarks_file)
    calib_sets: dict[str, CalibrationSet] = {}
    for name, raw in (config.get("calibration_sets") or {}).items():
        calib_sets[name] = _calibration_set(name, raw, base)
    models: dict[str, ModelEntry] = {}
    for name, raw in (config.get("models") or {}).items():
        key = f"models.{name}"
        _check_known("scheme", f"{key}.schemes", raw["schemes"], schemes)
        calibration = _model_calibration(
            f"{key}.calibration", raw.get("calibration"), tuple(raw["schemes"]), schemes, calib_sets
        )
        skip = frozenset((cell["scheme"], cell["benchmark"]) for cell in raw.get("skip", []))
        models[name] = ModelEntry(
            name=name,
            source=_source(name, raw, base),
            schemes=tuple(raw["schemes"]),
            calibration=calibration,
            params_b=raw.get("params_b"),
            skip=skip,
        )
    tables = []
    for i, raw in enumerate(config.get("tables") or []):
        key = f"tables[{i}] ({raw['name']})"
        _check_known("model", f"{key}.models", raw["models"], models)
        _check_known("benchmark", f"{key}.benchmarks", raw["benchmarks"], benchmarks)
        if raw.get("schemes"):
            _check_known("scheme", f"{key}.schemes", raw["schemes"], schemes)
        for labels in ("labels", "published_labels"):
            _check_known("benchmark", f"{key}.{labels}", raw.get(labels) or {}, tuple(raw["benchmarks"]))
        fixed = ("name", "models", "benchmarks", "caption", "schemes", "labels", "published_labels")
        options = {k: v for k, v in raw.items() if k not in fixed}
        tables.append(
            TableConfig(
                name=raw["name"],
                models=tuple(raw["models"]),
                benchmarks=tuple(raw["benchmarks"]),
                caption=raw.get("caption", ""),
                schemes=tuple(raw["schemes"]) if raw.get("schemes") else None,
                options=options,
                labels=dict(raw.get("labels") or {}),
                published_labels=dict(raw.get("published_labels") or {}),
            )
        )
    if not tables:
        raise QuantbenchError("tables: configure at least one table (name, models, benchmarks)")
    evaluation = _evaluation(config.get("evaluation") or {}, base)
    if evaluation.source == "local":
        for name in dict.fromkeys(bench for table in tables for bench in table.benchmarks):
            benchmarks[name].data_paths(evaluation.data_dir)
    compare = config.get("compare")
    if compare is not None:
        paths = {k: base / compare[k] for k in ("published", "recipe") if k in compare}
        compare = build_spec(CompareConfig, {**compare, **paths}, "compare")
    docs = config.get("docs")
    if docs is not None:
        docs = build_spec(
            DocsConfig, {**docs, "path": base / docs["path"], "notes": tuple(docs.get("notes", ()))}, "docs"
        )
    return RunConfig(
        results=Path(config.get("results", RESULTS)),
        benchmarks_file=benchmarks_file,
        schemes=schemes,
        benchmarks=benchmarks,
        workloads=load_workloads(benchmarks_file),
        models=models,
        calibration_sets=calib_sets,
        tables=tuple(tables),
        quantization=_section(QuantizationConfig, config, "quantization"),
        evaluation=evaluation,
        hardware=_section(Hardware, config, "hardware"),
        preflight=preflight_of(config),
        compare=compare,
        docs=docs,
    )

"""The workflow's run configuration: models, calibration sets, evaluation settings and tables, cross-checked.

The JSON schema (``workflow/schemas/config.schema.yaml``) checks shapes and types; this module checks what a
schema cannot: that every scheme, benchmark, calibration set and model a key refers to exists, that each model
and each calibration set has exactly one source (a JSONL, whose images must exist, or a Hub dataset split with
its column names), that every scheme needing calibration has a calibration set (one per model, or one per
scheme), and that benchmark data is present. ``scheme_overrides`` change fields of the schemes file's
schemes for this run (how config/seed.yaml selects the published recipe's behaviour where it departs from
quantbench's; docs/fidelity.md). It takes a plain dict, so the workflow, the CLI and the tests share one
reading of the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantbench.calibration.stream import StreamSpec
from quantbench.util.errors import QuantbenchError
from quantbench.evaluate.benchmarks import BenchmarkSpec
from quantbench.calibration.hubsets import HubImageSet
from quantbench.checkpoint.download import ModelSource
from quantbench.util.jsonl import iter_jsonl
from quantbench.quant.schemes import Scheme, load_schemes


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration set: a JSONL file (and the images its records name) or a Hub split, how many samples of how
    many tokens, and how records become samples (:class:`~quantbench.calibration.stream.StreamSpec`)."""

    name: str
    num_samples: int
    max_seq_len: int
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
class RunConfig:
    """A validated run configuration."""

    results: Path
    schemes: Mapping[str, Scheme]
    models: Mapping[str, ModelEntry]
    calibration_sets: Mapping[str, CalibrationSet]
    evaluation: Mapping[str, Any]
    tables: tuple[TableConfig, ...]

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
    size = {"num_samples": int(raw.get("num_samples", 128)), "max_seq_len": int(raw.get("max_seq_len", 2048)),
            "seed": int(raw.get("seed", 0)), "stream": StreamSpec.from_dict(raw, key)}
    if "hub" in raw:
        return CalibrationSet(name=name, hub=HubImageSet.from_dict(raw["hub"], f"{key}.hub"), **size)
    path = base / raw["path"]
    if not path.is_file():
        raise QuantbenchError(f"{key}.path: {path} does not exist")
    return CalibrationSet(name=name, path=path, images=_record_images(path, key), **size)


def _record_images(path: Path, key: str) -> tuple[Path, ...]:
    """The image files the records of the JSONL ``path`` name (relative to its folder), each once, checked to exist."""
    try:
        images = [path.parent / record["image"] for _, record in iter_jsonl(path, "calibration file") if "image" in record]
    except QuantbenchError as exc:
        raise QuantbenchError(f"{key}.path: {exc}") from None
    missing = [str(image) for image in dict.fromkeys(images) if not image.is_file()]
    if missing:
        raise QuantbenchError(f"{key}.path: {path} names image(s) that do not exist: {', '.join(missing[:5])}")
    return tuple(dict.fromkeys(images))


def _model_calibration(
    key: str, raw: Any, schemes: tuple[str, ...], all_schemes: Mapping[str, Scheme], calib_sets: Mapping[str, CalibrationSet]
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


def load_run_config(
    config: Mapping[str, Any], *, base_dir: str | Path = ".", benchmarks: Mapping[str, BenchmarkSpec]
) -> RunConfig:
    """Cross-check a (schema-validated) config dict; relative paths resolve against ``base_dir``.

    ``benchmarks`` are the benchmarks the benchmarks file defines. With the ``local`` data source, every
    benchmark a table uses must have its data files under ``evaluation.data_dir``.
    """
    base = Path(base_dir)
    schemes = load_schemes(base / config.get("schemes_file", "config/schemes.yaml"), config.get("scheme_overrides"))
    calib_sets: dict[str, CalibrationSet] = {}
    for name, raw in (config.get("calibration_sets") or {}).items():
        calib_sets[name] = _calibration_set(name, raw, base)
    models: dict[str, ModelEntry] = {}
    for name, raw in (config.get("models") or {}).items():
        key = f"models.{name}"
        _check_known("scheme", f"{key}.schemes", raw["schemes"], schemes)
        calibration = _model_calibration(f"{key}.calibration", raw.get("calibration"), tuple(raw["schemes"]), schemes, calib_sets)
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
    evaluation = dict(config.get("evaluation") or {})
    if evaluation.get("source", "local") == "local":
        data_dir = base / evaluation.get("data_dir", "resources/data")
        for name in dict.fromkeys(bench for table in tables for bench in table.benchmarks):
            benchmarks[name].data_paths(data_dir)
    return RunConfig(
        results=Path(config.get("results", "results")),
        schemes=schemes,
        models=models,
        calibration_sets=calib_sets,
        evaluation=evaluation,
        tables=tuple(tables),
    )

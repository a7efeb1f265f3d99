"""Benchmarks as data: parse `config/benchmarks.yaml` into frozen specs, and apply a run's overrides.

A benchmark is either scored through lm-eval (``spec.lm_eval``: the built-in task for the hub source,
the project's twin for local JSONL files, few-shot count, reported metric and filter, scorer, chat
template), is a perplexity (``spec.perplexity``), or is a vision-language task (``spec.lmms_eval``:
lmms-eval's task for the hub source, the project's offline scorer over local image-text files,
:mod:`quantbench.evaluate.vlm_eval`). Code asks the spec; it never tests benchmark names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantbench.util.errors import QuantbenchError
from quantbench.util.specfile import build_spec, read_section

SCORERS = ("lm_eval", "sandbox")
VLM_SCORERS = ("anls", "relaxed", "mmmu")
# Run-time overrides a workflow may set per benchmark, and the settings block each one changes.
OVERRIDES = {
    "max_gen_toks": "lm_eval",
    "seq_len": "perplexity",
    "max_tokens": "perplexity",
    "max_new_tokens": "lmms_eval",
}


@dataclass(frozen=True)
class LmEvalSettings:
    """How lm-eval scores the benchmark.

    The hub source runs lm-eval's built-in task ``hub_task``, or, for a benchmark lm-eval does not ship,
    the project's task ``local_task`` over the Hub files ``hub_data`` (per split of the benchmark's
    ``files``: the keyword arguments of ``datasets.load_dataset``). ``chat_template``: prompts go through
    the model's chat template; ``think_end_token``: only the reply after its last occurrence is scored
    (lm-eval's reasoning-model option).
    """

    local_task: str
    num_fewshot: int
    metric: str
    hub_task: str | None = None
    hub_data: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    filter: str = "none"
    scorer: str = "lm_eval"
    generation: Mapping[str, Any] = field(default_factory=dict)
    chat_template: bool = False
    think_end_token: str | None = None

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if (self.hub_task is None) == (not self.hub_data):
            raise ValueError(
                "give exactly one of hub_task (lm-eval's built-in task) or hub_data (the Hub files "
                "the local task reads)"
            )

    @property
    def result_key(self) -> str:
        """The key of the score in lm-eval's per-task results, e.g. ``exact_match,strict-match``."""
        return f"{self.metric},{self.filter}"


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one generated program's run (HumanEval)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    output_kb: int = 1024

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.output_kb <= 0:
            raise ValueError("timeout_s, memory_mb and output_kb must be positive")


@dataclass(frozen=True)
class PerplexitySettings:
    """Non-overlapping-window perplexity over rows joined with blank lines."""

    seq_len: int
    max_tokens: int | None = None
    hub: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= seq_len ({self.seq_len}) or null")


@dataclass(frozen=True)
class LmmsEvalSettings:
    """A vision-language benchmark: lmms-eval's task and metric (hub source), and the offline scorer (local files).

    ``scorer`` is the metric of :mod:`quantbench.evaluate.vqa_metrics` the local scorer applies to the
    records of ``files[split]``; ``prompt`` is the user's text (``{question}``), ``choice_prompt`` that of a
    multiple-choice question (``{question}``, ``{options}``: one ``A. text`` line each);
    ``max_new_tokens`` bounds each greedy answer.
    """

    task: str
    metric: str
    scorer: str
    split: str
    prompt: str = "{question}"
    choice_prompt: str = "{question}\n{options}"
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.scorer not in VLM_SCORERS:
            raise ValueError(f"scorer must be one of {VLM_SCORERS}, got {self.scorer!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark column: its data files and how it is scored (exactly one of lm_eval, perplexity,
    lmms_eval)."""

    name: str
    files: Mapping[str, str]
    lm_eval: LmEvalSettings | None = None
    perplexity: PerplexitySettings | None = None
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    lmms_eval: LmmsEvalSettings | None = None

    @property
    def percent(self) -> bool:
        """True when the score is a percentage (accuracy-like), False for perplexity."""
        return self.perplexity is None

    def data_paths(self, data_dir: str | Path) -> dict[str, Path]:
        """The benchmark's files under ``data_dir`` by split; a missing file is a QuantbenchError."""
        paths = {split: Path(data_dir) / rel for split, rel in self.files.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise QuantbenchError(
                f"benchmark {self.name}: data file(s) {', '.join(missing)} not found; pass --data-dir "
                f"(evaluation.data_dir) pointing at a folder with {', '.join(self.files.values())} "
                "(resources/data for the demo subsets, ../shared/data for the full sets)"
            )
        return paths

    def with_overrides(self, overrides: Mapping[str, Any]) -> BenchmarkSpec:
        """A copy with a run's overrides (keys of ``OVERRIDES``) applied and recorded in ``overrides``."""
        spec = self
        for key, value in overrides.items():
            where = f"benchmark {self.name}: override {key}"
            block = OVERRIDES.get(key)
            if block is None:
                raise QuantbenchError(f"{where} is unknown; allowed: {sorted(OVERRIDES)}")
            settings = getattr(spec, block)
            if settings is None:
                raise QuantbenchError(f"{where} applies to {block} benchmarks only")
            positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not positive and not (key == "max_tokens" and value is None):
                raise QuantbenchError(f"{where} must be a positive integer, got {value!r}")
            if block == "lm_eval":
                settings = dataclasses.replace(settings, generation={**settings.generation, key: value})
            elif block == "lmms_eval":
                settings = dataclasses.replace(settings, max_new_tokens=value)
            else:
                settings = build_spec(PerplexitySettings, {**_plain(settings), key: value}, where)
            spec = dataclasses.replace(spec, **{block: settings}, overrides={**spec.overrides, key: value})
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain data for provenance (the result JSON) and Snakemake ``params:``."""
        return _plain(self)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def parse_benchmark(name: str, raw: Mapping[str, Any]) -> BenchmarkSpec:
    """Build a :class:`BenchmarkSpec` from its YAML mapping, with errors naming the benchmark and key."""
    where = f"benchmark {name!r}"
    raw = dict(raw or {})
    files = raw.get("files")
    if not isinstance(files, Mapping) or not files:
        raise QuantbenchError(f"{where}.files: give the data files as a mapping split -> relative path")
    if sum(kind in raw for kind in ("lm_eval", "perplexity", "lmms_eval")) != 1:
        raise QuantbenchError(
            f"{where}: give exactly one of 'lm_eval' or 'perplexity' (or 'lmms_eval' for a vision-language task)"
        )
    lm_eval = build_spec(LmEvalSettings, raw["lm_eval"], f"{where}.lm_eval") if "lm_eval" in raw else None
    perplexity = (
        build_spec(PerplexitySettings, raw["perplexity"], f"{where}.perplexity") if "perplexity" in raw else None
    )
    lmms_eval = build_spec(LmmsEvalSettings, raw["lmms_eval"], f"{where}.lmms_eval") if "lmms_eval" in raw else None
    if lm_eval is not None and lm_eval.hub_data and set(lm_eval.hub_data) != set(files):
        raise QuantbenchError(
            f"{where}.lm_eval.hub_data: give the Hub files of exactly the splits of files ({sorted(files)}), "
            f"got {sorted(lm_eval.hub_data)}"
        )
    if lmms_eval is not None and lmms_eval.split not in files:
        raise QuantbenchError(
            f"{where}.lmms_eval.split: {lmms_eval.split!r} is not one of the files' splits {sorted(files)}"
        )
    sandbox = build_spec(SandboxLimits, raw.get("sandbox", {}), f"{where}.sandbox")
    unknown = sorted(set(raw) - {"files", "lm_eval", "perplexity", "lmms_eval", "sandbox"})
    if unknown:
        raise QuantbenchError(f"{where}: unknown key(s) {unknown}")
    return BenchmarkSpec(
        name=name, files=dict(files), lm_eval=lm_eval, perplexity=perplexity, sandbox=sandbox, lmms_eval=lmms_eval
    )


def load_benchmarks(path: str | Path) -> dict[str, BenchmarkSpec]:
    """Read every benchmark of a benchmarks YAML file (top-level key ``benchmarks``), in file order."""
    return {name: parse_benchmark(name, raw) for name, raw in read_section(path, "benchmarks").items()}


def get_benchmark(benchmarks: Mapping[str, BenchmarkSpec], name: str) -> BenchmarkSpec:
    """Look a benchmark up by name, or fail with the list of known names."""
    try:
        return benchmarks[name]
    except KeyError:
        raise QuantbenchError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(benchmarks)}") from None


def benchmark_from_dict(raw: Mapping[str, Any]) -> BenchmarkSpec:
    """Inverse of :meth:`BenchmarkSpec.to_dict` (how a workflow job receives its benchmark through ``params:``)."""
    body = {key: value for key, value in raw.items() if key not in ("name", "overrides") and value is not None}
    spec = parse_benchmark(raw["name"], body)
    return dataclasses.replace(spec, overrides=dict(raw.get("overrides") or {}))

"""lm-eval tasks for a benchmark: lm-eval's built-in task (source ``hub``) or the project's twin of it
over local JSONL files (source ``local``).

A local task is a template in ``quantbench/evaluate/tasks/<name>.yaml``: an lm-eval task config without
data, plus an optional ``per_subject`` or ``per_split`` block. At run time the benchmark's files
(``spec.files``, relative to a data directory: the demo subsets in resources/data, the full sets in
../shared/data, or a user's copy) are read once with ``datasets``' JSON loader and handed to lm-eval
tasks (:class:`LocalTask`); ``per_subject`` makes one task per subject (docs and few-shot docs of that
subject, like the Hub dataset's per-subject configs) grouped with a size-weighted mean, as lm-eval's mmlu
and ceval-valid are;
``per_split`` makes one task per listed split (file), grouped the same way (OlympiadBench's subsets).
A benchmark lm-eval does not ship runs the same template on its hub source, over the Hub files the
benchmark names (``hub_data``).

Demo subsets list their rows' positions in the full files in ``<data dir>/subsets.json``. lm-eval's
default few-shot sampler draws at random from the whole few-shot split, so for a subset the local task
uses :func:`subset_sampler`, which makes the same draws over the full split's positions and looks the
rows up in the subset: a subset item gets exactly the prompt it gets on the full data.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import yaml
from lm_eval.api.group import Group
from lm_eval.api.samplers import ContextSampler
from lm_eval.api.task import ConfigurableTask, Task
from lm_eval.tasks import TaskManager

from quantbench.evaluate.benchmarks import BenchmarkSpec
from quantbench.util.errors import QuantbenchError

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).parent / "tasks"
SUBSETS_FILE = "subsets.json"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


class _TemplateLoader(yaml.SafeLoader):
    """YAML loader with lm-eval's ``!function module.attr`` tag (absolute dotted names only)."""


def _function(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    module, _, attr = loader.construct_scalar(node).rpartition(".")
    return getattr(importlib.import_module(module), attr)


_TemplateLoader.add_constructor("!function", _function)


@dataclass(frozen=True)
class SubsetRows:
    """Where a subset file's rows sit in its full source file."""

    rows: tuple[int, ...]
    source_rows: int


def load_template(name: str) -> dict[str, Any]:
    """The local task template ``name`` (file stem in ``TEMPLATES_DIR``)."""
    path = TEMPLATES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATES_DIR.glob("*.yaml") if "task" in _read_yaml(p))
        raise QuantbenchError(f"no local task template {name!r} in {TEMPLATES_DIR}; known: {', '.join(known)}")
    return _read_yaml(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_TemplateLoader) or {}  # SafeLoader + !function


def subset_rows(data_dir: str | Path) -> dict[str, SubsetRows]:
    """The subsets manifest of ``data_dir`` (relative file -> rows), empty where there is none."""
    path = Path(data_dir) / SUBSETS_FILE
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {rel: SubsetRows(tuple(entry["rows"]), int(entry["source_rows"])) for rel, entry in raw.items()}


def subset_sampler(subset: SubsetRows) -> type[ContextSampler]:
    """A sampler over a subset that returns what lm-eval's default sampler returns over the full split.

    ``random.Random.sample`` picks indices from the population's length alone, so sampling
    ``range(source_rows)`` with the same generator gives the full split's positions of the rows lm-eval
    would draw; those are looked up in the subset. A draw outside the subset is an error.
    """
    where = {row: i for i, row in enumerate(subset.rows)}

    class SubsetSampler(ContextSampler):
        def sample(self, n: int, eval_doc: dict | None = None, df: Sequence[dict] | None = None, **kwargs):
            if eval_doc is not None:
                raise QuantbenchError("a subset few-shot split must differ from the evaluation split")
            drawn = self.rnd.sample(range(subset.source_rows), n)
            absent = [row for row in drawn if row not in where]
            if absent:
                raise QuantbenchError(
                    f"few-shot rows {absent} of the full split are not in this subset; "
                    "evaluate only the subset's items, or use the full data (--data-dir)"
                )
            docs = self.fewshot_docs()
            return [docs[where[row]] for row in drawn]

    return SubsetSampler


class LocalTask(ConfigurableTask):
    """An lm-eval task over a dataset quantbench has already loaded (``download`` hands it over)."""

    def __init__(self, dataset: datasets.DatasetDict, config: dict[str, Any]) -> None:
        self._local_dataset = dataset
        super().__init__(config=config)

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.dataset = self._local_dataset


def build_local_task(spec: BenchmarkSpec, data_dir: str | Path) -> Task | Group:
    """The project's twin of ``spec``'s lm-eval task over the files in ``data_dir``."""
    cfg, splits = _template_splits(spec)
    paths = spec.data_paths(data_dir)
    try:
        # one split at a time: each file's column types are its own (a column all null in one file)
        dataset = datasets.DatasetDict(
            {s: datasets.load_dataset("json", data_files=str(paths[s]), split="train") for s in sorted(splits)}
        )
    except Exception as exc:  # malformed JSONL, unreadable file
        raise QuantbenchError(
            f"benchmark {spec.name}: could not read {', '.join(str(paths[s]) for s in sorted(splits))} as JSONL "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    fewshot_split = cfg.get("fewshot_split")
    subset = subset_rows(data_dir).get(spec.files[fewshot_split]) if fewshot_split else None
    if subset is not None and (cfg.get("fewshot_config") or {}).get("sampler", "default") == "default":
        log.info(
            "%s: few-shot examples drawn over the %d rows of the full %s split (%s is a subset)",
            spec.name,
            subset.source_rows,
            fewshot_split,
            spec.files[fewshot_split],
        )
        cfg["fewshot_config"] = {**(cfg.get("fewshot_config") or {}), "sampler": subset_sampler(subset)}
    return _task_from_template(cfg, dataset)


def _template_splits(spec: BenchmarkSpec) -> tuple[dict[str, Any], set[str]]:
    """The local task template of ``spec`` and the splits of ``spec.files`` it reads (checked to exist)."""
    cfg = load_template(spec.lm_eval.local_task)
    splits = {cfg[key] for key in SPLIT_KEYS if cfg.get(key)} | set((cfg.get("per_split") or {}).get("splits", []))
    if splits - set(spec.files):
        raise QuantbenchError(
            f"benchmark {spec.name}: task template {spec.lm_eval.local_task} reads split(s) "
            f"{sorted(splits - set(spec.files))} but files: gives only {sorted(spec.files)}"
        )
    return cfg, splits


def _task_from_template(cfg: dict[str, Any], dataset: datasets.DatasetDict) -> Task | Group:
    per_subject, per_split = cfg.pop("per_subject", None), cfg.pop("per_split", None)
    if per_subject is not None:
        return _subject_group(cfg, per_subject, dataset)
    if per_split is not None:
        return _split_group(cfg, per_split, dataset)
    return LocalTask(dataset, cfg)


def _split_group(cfg: dict[str, Any], per_split: Mapping[str, Any], dataset: datasets.DatasetDict) -> Group:
    """One task per split of ``per_split["splits"]`` (each scored as its own test split), as one group."""
    group = _group(per_split)
    for split in per_split["splits"]:
        group.add(
            LocalTask(
                datasets.DatasetDict({split: dataset[split]}),
                {**cfg, "task": f"{cfg['task']}_{split}", "test_split": split},
            )
        )
    return group


def _group(settings: Mapping[str, Any]) -> Group:
    return Group.from_config(
        {
            "group": settings["group"],
            "aggregate_metric_list": list(settings["aggregate_metric_list"]),
            "metadata": {"version": settings["group_version"]},
        }
    )


def _subject_group(cfg: dict[str, Any], per_subject: Mapping[str, Any], dataset: datasets.DatasetDict) -> Group:
    field = per_subject["field"]
    eval_split = cfg.get("test_split") or cfg["validation_split"]
    subjects = list(dict.fromkeys(dataset[eval_split][field]))
    names = _subject_names(per_subject, subjects)
    rows = {split: _rows_by_value(ds[field]) for split, ds in dataset.items()}
    group = _group(per_subject)
    for subject in subjects:
        part = datasets.DatasetDict({split: ds.select(rows[split].get(subject, [])) for split, ds in dataset.items()})
        config = {
            **cfg,
            "task": f"{cfg['task']}_{subject}",
            "description": cfg["description"].replace("{subject_name}", names[subject]),
        }
        group.add(LocalTask(part, config))
    return group


def _rows_by_value(values: Sequence[str]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        rows.setdefault(value, []).append(i)
    return rows


def _subject_names(per_subject: Mapping[str, Any], subjects: Sequence[str]) -> dict[str, str]:
    if not per_subject.get("names"):
        return {s: s.replace("_", " ") for s in subjects}
    path = TEMPLATES_DIR / per_subject["names"]
    names = _read_yaml(path)["names"]
    unknown = [s for s in subjects if s not in names]
    if unknown:
        raise QuantbenchError(f"subject(s) {unknown} of the data are not in {path}; known: {', '.join(names)}")
    return {s: names[s] for s in subjects}


@functools.cache
def builtin_task_manager() -> TaskManager:
    """lm-eval's index of its built-in tasks (slow to build, so built once per process)."""
    return TaskManager()


def build_hub_task(spec: BenchmarkSpec) -> Task | Group:
    """lm-eval's built-in task or group ``spec.lm_eval.hub_task``, lm-eval downloading its dataset; or the
    project's task over the Hub files ``spec.lm_eval.hub_data``."""
    if spec.lm_eval.hub_task is None:
        return _hub_data_task(spec)
    name = spec.lm_eval.hub_task
    manager = builtin_task_manager()
    if name not in manager.all_tasks:
        raise QuantbenchError(
            f"benchmark {spec.name}: lm-eval {_lm_eval_version()} does not know the task {name!r}; "
            "fix lm_eval.hub_task in the benchmarks file (`lm-eval ls tasks` lists them)"
        )
    try:
        loaded = manager.load([name])
    except Exception as exc:  # dataset download, task code import: report, don't crash the workflow
        raise QuantbenchError(
            f"benchmark {spec.name}: could not load lm-eval task {name!r} from the hub "
            f"({type(exc).__name__}: {exc}); without internet use --source local"
        ) from exc
    return loaded["groups"].get(name) or loaded["tasks"][name]


def _hub_data_task(spec: BenchmarkSpec) -> Task | Group:
    cfg, splits = _template_splits(spec)
    parts = {}
    for split in sorted(splits):
        source = dict(spec.lm_eval.hub_data[split])
        try:
            parts[split] = datasets.load_dataset(**source)
        except Exception as exc:  # no network, gated or moved dataset, bad revision
            raise QuantbenchError(
                f"benchmark {spec.name}: could not load {source} from the hub ({type(exc).__name__}: {exc}); "
                "without internet use --source local"
            ) from exc
    return _task_from_template(cfg, datasets.DatasetDict(parts))


def leaf_tasks(root: Task | Group) -> list[Task]:
    """Every task lm-eval scores for ``root`` (itself, or a group's tasks)."""
    return list(root.get_all_tasks()) if isinstance(root, Group) else [root]


def task_name(root: Task | Group) -> str:
    return root.name if isinstance(root, Group) else root.task_name


def task_version(root: Task | Group) -> str:
    """The version lm-eval reports for ``root`` (a group's metadata version, or the task's VERSION)."""
    version = (root.metadata or {}).get("version") if isinstance(root, Group) else root.VERSION
    return str(version)


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")

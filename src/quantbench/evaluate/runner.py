"""The evaluate step: score one checkpoint on one benchmark and write one result JSON (atomically).

Everything a user can get wrong (missing data file, unknown task, missing vllm, a model that crashes)
is checked or caught before anything is written, so a failed job leaves no result file.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from quantbench import __version__
from quantbench.checkpoint.preflight import Headroom, check_requirements, evaluate_requirements
from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import BenchmarkSpec
from quantbench.evaluate.perplexity import read_rows, wikitext_perplexity
from quantbench.evaluate.results import Outcome, checkpoint_hash, file_sha256, reproduce_command, versions
from quantbench.util.errors import QuantbenchError
from quantbench.util.io import atomic_write_json

log = logging.getLogger(__name__)

SOURCES = ("local", "hub")


def evaluate_benchmark(
    model_dir: str | Path,
    spec: BenchmarkSpec,
    *,
    out_path: str | Path,
    model_name: str,
    scheme_name: str | None = None,
    source: str = "local",
    data_dir: str | Path | None = None,
    backend: Backend | None = None,
    limit: int | None = None,
    benchmarks_file: str | Path | None = None,
    headroom: Headroom = Headroom(),
) -> dict[str, Any]:
    """Score ``model_dir`` on ``spec`` and write the result JSON to ``out_path``; return the result.

    ``source``: ``local`` (the project's tasks over the JSONL files in ``data_dir``, which it needs) or ``hub``
    (lm-eval's built-in task and dataset). ``limit``: score only the first N items of each lm-eval task
    (per subject for grouped benchmarks; perplexity: the first N windows). ``benchmarks_file`` (the file
    ``spec`` came from) is only recorded, in the command that reproduces the result. Before the model is loaded, free disk and host memory
    are checked (:mod:`quantbench.checkpoint.preflight`; ``headroom``: what must stay free beyond the need).
    """
    started = time.perf_counter()
    backend = backend or Backend()
    model_dir = Path(model_dir)
    if source not in SOURCES:
        raise QuantbenchError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "local" and data_dir is None:
        raise QuantbenchError(
            f"benchmark {spec.name}: the local data source reads JSONL files; pass their folder (--data-dir)"
        )
    if limit is not None and limit < 1:
        raise QuantbenchError(f"limit must be a positive number of items, got {limit}")
    if not (model_dir / "config.json").is_file():
        raise QuantbenchError(f"{model_dir} is not a model directory (no config.json)")
    on_host = backend.name == "hf" and backend.device == "cpu"
    requirements = evaluate_requirements(
        model_dir, out_path, host_dtype_bytes=backend.torch_dtype.itemsize if on_host else None, headroom=headroom
    )
    check_requirements(requirements, f"evaluate {model_dir} on {spec.name}")
    data = _data_provenance(spec, source, data_dir)
    if spec.lm_eval is not None:
        # lm-eval (and datasets, pandas) load only for the benchmarks that need them: their imports take seconds.
        from quantbench.evaluate.harness import make_lm, run_lm_eval
        from quantbench.evaluate.tasks import build_hub_task, build_local_task

        root = build_local_task(spec, data_dir) if source == "local" else build_hub_task(spec)
        outcome = run_lm_eval(make_lm(model_dir, backend, spec.lm_eval), spec, root, source=source, limit=limit)
        used_backend = backend
    elif spec.lmms_eval is not None:
        from quantbench.evaluate.vlm_eval import score_lmms_eval, score_local

        if source == "local":
            used_backend = dataclasses.replace(backend, name="hf", batch_size=1)
            outcome = score_local(model_dir, spec, data_dir, used_backend, limit)
        else:
            outcome, used_backend = score_lmms_eval(model_dir, spec, backend, limit), backend
    else:
        outcome = _perplexity(model_dir, spec, source, data_dir, backend, limit)
        used_backend = dataclasses.replace(backend, name="hf", batch_size=1)
    scale = 100.0 if spec.percent else 1.0
    command = reproduce_command(
        {
            "model": model_dir,
            "benchmark": spec.name,
            "benchmarks": benchmarks_file,
            "source": source,
            "data-dir": data_dir if source == "local" else None,
            "limit": limit,
            **{key.replace("_", "-"): value for key, value in spec.overrides.items()},
            "backend": used_backend.name,
            "device": used_backend.device,
            "dtype": used_backend.dtype,
            "batch-size": used_backend.batch_size if used_backend.name == "hf" else None,
            "threads": used_backend.threads if used_backend.name == "hf" else None,
            "tensor-parallel-size": used_backend.tensor_parallel_size if used_backend.name == "vllm" else None,
            "model-name": model_name,
            "scheme": scheme_name,
            "out": out_path,
        }
    )
    result = {
        "benchmark": spec.name,
        "score": outcome.score * scale,
        "stderr": None if outcome.stderr is None else outcome.stderr * scale,
        "unit": "percent" if spec.percent else "perplexity",
        "metric": spec.lm_eval.result_key
        if spec.lm_eval
        else (spec.lmms_eval.metric if spec.lmms_eval else "perplexity"),
        "scores": {key: value * scale for key, value in outcome.scores.items()},
        "items": outcome.items,
        "limit": limit,
        "num_fewshot": spec.lm_eval.num_fewshot if spec.lm_eval else None,
        "task": {"name": outcome.task, "version": outcome.task_version},
        "data": data,
        "spec": spec.to_dict(),
        "backend": _backend_record(used_backend),
        "model": model_name,
        "scheme": scheme_name,
        "model_dir": str(model_dir),
        "checkpoint_sha256": checkpoint_hash(model_dir),
        "versions": versions(),
        "details": outcome.details,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "command": command,
    }
    atomic_write_json(out_path, result)
    log.info("%s on %s (%s): %.2f -> %s", spec.name, model_name, scheme_name, result["score"], out_path)
    return result


def _data_provenance(spec: BenchmarkSpec, source: str, data_dir: str | Path | None) -> dict[str, Any]:
    if source == "hub":
        if spec.lm_eval is not None and spec.lm_eval.hub_task is None:
            return {"source": "hub", "datasets": {split: dict(kw) for split, kw in spec.lm_eval.hub_data.items()}}
        if spec.lm_eval is not None:
            return {"source": "hub", "lm_eval_task": spec.lm_eval.hub_task}
        if spec.lmms_eval is not None:
            return {"source": "hub", "lmms_eval_task": spec.lmms_eval.task}
        return {"source": "hub", "dataset": dict(spec.perplexity.hub)}
    paths = spec.data_paths(data_dir)
    return {
        "source": "local",
        "data_dir": str(data_dir),
        "files": {split: {"path": spec.files[split], "sha256": file_sha256(path)} for split, path in paths.items()},
    }


def _backend_record(backend: Backend) -> dict[str, Any]:
    record: dict[str, Any] = {"name": backend.name, "device": backend.device, "dtype": str(backend.dtype)}
    if backend.name == "hf":
        record |= {
            "torch_dtype": str(backend.torch_dtype).removeprefix("torch."),
            "batch_size": backend.batch_size,
            "threads": backend.threads,
        }
    else:
        record["tensor_parallel_size"] = backend.tensor_parallel_size
    return record


def _perplexity(
    model_dir: Path, spec: BenchmarkSpec, source: str, data_dir: str | Path | None, backend: Backend, limit: int | None
) -> Outcome:
    settings = spec.perplexity
    if source == "local":
        texts = read_rows(spec.data_paths(data_dir)["test"])
    else:
        import datasets

        try:
            texts = datasets.load_dataset(**settings.hub)["text"]
        except Exception as exc:
            raise QuantbenchError(
                f"benchmark {spec.name}: could not load {dict(settings.hub)} from the hub "
                f"({type(exc).__name__}: {exc}); without internet use --source local"
            ) from exc
    caps = [c for c in (settings.max_tokens, limit * settings.seq_len if limit else None) if c is not None]
    if backend.name != "hf":
        log.info(
            "%s: perplexity runs on the hf backend (lm-eval's %s backend scores no token windows)",
            spec.name,
            backend.name,
        )
    model, tokenizer = backend.load(model_dir)
    try:
        ppl = wikitext_perplexity(model, tokenizer, texts, seq_len=settings.seq_len, max_tokens=min(caps, default=None))
    except QuantbenchError:
        raise
    except Exception as exc:
        raise QuantbenchError(f"benchmark {spec.name}: the model failed ({type(exc).__name__}: {exc})") from exc
    return Outcome(
        score=ppl.perplexity,
        stderr=None,
        items=ppl.windows,
        task="quantbench.evaluate.perplexity.wikitext_perplexity",
        task_version=__version__,
        details={"windows": ppl.windows, "predicted_tokens": ppl.predicted_tokens, "seq_len": settings.seq_len},
    )

"""Score one benchmark through lm-eval's Python API: the lm-eval model for a backend, ``simple_evaluate``,
the configured metric (or the generated programs scored in the sandbox).

Backends: ``hf`` wraps the model object of :func:`quantbench.runtime.load_model` (plain or simulated-
quantization checkpoints) in lm-eval's HFLM; ``vllm`` is lm-eval's vLLM backend on the checkpoint path,
where the vllm package is installed. Prompts go through the model's chat template only where the benchmark
says so (``chat_template``; the published text tables use none); a BOS token is prepended where the
tokenizer has one (``add_bos_token=True``).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.api.group import Group
from lm_eval.api.metrics import mean_stderr
from lm_eval.api.model import LM
from lm_eval.api.task import Task
from lm_eval.tasks import TaskManager

from quantbench.errors import QuantbenchError
from quantbench.evaluate import sandbox
from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import BenchmarkSpec, LmEvalSettings
from quantbench.evaluate.results import Outcome
from quantbench.evaluate.tasks import builtin_task_manager, leaf_tasks, task_name, task_version

log = logging.getLogger(__name__)


def make_lm(model_dir: str | Path, backend: Backend, settings: LmEvalSettings | None = None) -> LM:
    """The lm-eval model for ``model_dir`` on ``backend``; ``settings``' think_end_token, if any, makes it
    return only the reply after that marker."""
    reasoning = {"think_end_token": settings.think_end_token} if settings and settings.think_end_token else {}
    if backend.name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise QuantbenchError(
                "backend 'vllm' needs the vllm package, which is not installed here; "
                "install it (pip install vllm) or set the evaluation backend to 'hf'"
            )
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM(
            pretrained=str(model_dir),
            dtype="auto" if backend.dtype == "auto" else backend.dtype,
            tensor_parallel_size=backend.tensor_parallel_size,
            add_bos_token=True,
            batch_size="auto",
            **reasoning,
        )
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = backend.load(model_dir)
    return HFLM(pretrained=model, tokenizer=tokenizer, add_bos_token=True, batch_size=backend.batch_size, **reasoning)


def run_lm_eval(
    lm: LM, spec: BenchmarkSpec, root: Task | Group, *, source: str, limit: int | None = None
) -> Outcome:
    """Evaluate ``root`` (built for ``spec``) with ``lm``; ``limit``: first N docs of each lm-eval task."""
    settings = spec.lm_eval
    leaves = leaf_tasks(root)
    samples = {t.task_name: list(range(min(limit, len(t.eval_docs)))) for t in leaves} if limit else None
    by_sandbox = settings.scorer == "sandbox"
    builtin = source == "hub" and settings.hub_task is not None
    manager = builtin_task_manager() if builtin else TaskManager(include_defaults=False)
    log.info("%s: lm-eval task %s (%s), %d-shot, %s items", spec.name, task_name(root), source,
             settings.num_fewshot, "all" if limit is None else f"first {limit} per task")
    try:
        out = simple_evaluate(
            model=lm,
            tasks=[root],
            num_fewshot=settings.num_fewshot,
            samples=samples,
            gen_kwargs=copy.deepcopy(dict(settings.generation)) or None,  # lm-eval appends to `until`
            task_manager=manager,
            apply_chat_template=settings.chat_template,
            predict_only=by_sandbox,
            confirm_run_unsafe_code=by_sandbox,
            log_samples=by_sandbox,
        )
    except QuantbenchError:
        raise
    except Exception as exc:
        raise QuantbenchError(
            f"benchmark {spec.name}: evaluation failed in lm-eval ({type(exc).__name__}: {exc})"
        ) from exc
    name = task_name(root)
    if by_sandbox:
        return _sandbox_outcome(spec, out["samples"], leaves, name, task_version(root))
    row = out["results"][name]
    if settings.result_key not in row:
        raise QuantbenchError(
            f"benchmark {spec.name}: lm-eval reported no {settings.result_key!r} for {name}; "
            f"it reported {sorted(k for k in row if ',' in k)}; fix metric/filter in the benchmarks file"
        )
    stderr = row.get(f"{settings.metric}_stderr,{settings.filter}")
    return Outcome(
        score=float(row[settings.result_key]),
        stderr=float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
        items=sum(out["n-samples"][t.task_name]["effective"] for t in leaves),
        task=name,
        task_version=task_version(root),
        scores=reported_scores(row),
    )


def reported_scores(row: dict) -> dict[str, float]:
    """Every ``metric,filter`` score lm-eval reported for a task (stderrs left out), e.g. GSM8K's
    ``exact_match,strict-match`` and ``exact_match,flexible-extract``."""
    return {
        key: float(value)
        for key, value in row.items()
        if "," in key and "_stderr," not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _sandbox_outcome(
    spec: BenchmarkSpec, logged: dict[str, list[dict]], leaves: Sequence[Task], name: str, version: str
) -> Outcome:
    settings = spec.lm_eval
    programs: list[str] = []
    tests: list[str] = []
    for task in leaves:
        for sample in logged[task.task_name]:
            if sample["filter"] != settings.filter:
                continue
            (candidates,) = sample["filtered_resps"]  # one request per doc
            programs.append(candidates[0])  # greedy, one sample: pass@1
            tests.append(sample["target"])
    if not programs:
        raise QuantbenchError(f"benchmark {spec.name}: lm-eval logged no samples for filter {settings.filter!r}")
    verdicts = sandbox.score_programs(programs, tests, spec.sandbox)
    passed = [1.0 if v.passed else 0.0 for v in verdicts]
    mean = sum(passed) / len(passed)
    stderr = mean_stderr(passed) if len(passed) > 1 else None
    counts = {s: sum(v.status == s for v in verdicts) for s in (sandbox.PASSED, sandbox.FAILED, sandbox.TIMEOUT)}
    details = {"isolation": sandbox.isolation(), "limits": spec.to_dict()["sandbox"], "counts": counts}
    return Outcome(score=mean, stderr=stderr, items=len(passed), task=name, task_version=version,
                   details={"sandbox": details})

"""Score one benchmark through lm-eval's Python API: the lm-eval model for a backend, ``simple_evaluate``,
the configured metric (or the generated programs scored in the sandbox).

Backends: ``hf`` wraps the model object of :func:`quantbench.runtime.load_model` (plain or simulated-
quantization checkpoints) in lm-eval's HFLM; ``vllm`` is lm-eval's vLLM backend on the checkpoint path,
where the vllm package is installed. Prompts never use a chat template; a BOS token is prepended where
the tokenizer has one (``add_bos_token=True``).
"""

from __future__ import annotations

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
from quantbench.evaluate.benchmarks import BenchmarkSpec
from quantbench.evaluate.results import Outcome
from quantbench.evaluate.tasks import builtin_task_manager, leaf_tasks, task_name, task_version

log = logging.getLogger(__name__)


def make_lm(model_dir: str | Path, backend: Backend) -> LM:
    """The lm-eval model for ``model_dir`` on ``backend``."""
    if backend.name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise QuantbenchError(
                "backend 'vllm' needs the vllm package, which is not installed here; run the evaluation in "
                "an environment with vLLM (`make vllm-env` creates .venv-vllm; README) or set the evaluation backend to 'hf'"
            )
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM(
            pretrained=str(model_dir),
            dtype="auto" if backend.dtype == "auto" else backend.dtype,
            tensor_parallel_size=backend.tensor_parallel_size,
            add_bos_token=True,
            batch_size="auto",
            **backend.vllm_engine_options(),
        )
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = backend.load(model_dir)
    return HFLM(pretrained=model, tokenizer=tokenizer, add_bos_token=True, batch_size=backend.batch_size)


def run_lm_eval(
    lm: LM, spec: BenchmarkSpec, root: Task | Group, *, source: str, limit: int | None = None
) -> Outcome:
    """Evaluate ``root`` (built for ``spec``) with ``lm``; ``limit``: first N docs of each lm-eval task."""
    settings = spec.lm_eval
    leaves = leaf_tasks(root)
    samples = {t.task_name: list(range(min(limit, len(t.eval_docs)))) for t in leaves} if limit else None
    by_sandbox = settings.scorer == "sandbox"
    manager = builtin_task_manager() if source == "hub" else TaskManager(include_defaults=False)
    log.info("%s: lm-eval task %s (%s), %d-shot, %s items", spec.name, task_name(root), source,
             settings.num_fewshot, "all" if limit is None else f"first {limit} per task")
    try:
        out = simple_evaluate(
            model=lm,
            tasks=[root],
            num_fewshot=settings.num_fewshot,
            samples=samples,
            gen_kwargs=dict(settings.generation) or None,
            task_manager=manager,
            predict_only=by_sandbox,
            confirm_run_unsafe_code=by_sandbox,
            log_samples=True,
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
        details={"per_item": per_item(spec, out["samples"], leaves)},
    )


def per_item(spec: BenchmarkSpec, logged: dict[str, list[dict]], leaves: Sequence[Task]) -> list[dict]:
    """Each scored item: its task and doc id, its metric value, and what the model answered: the
    log-likelihood of every choice (multiple choice) or the filtered response (generation). Two backends'
    results can then be compared item by item."""
    settings = spec.lm_eval
    items = []
    for task in leaves:
        for sample in logged[task.task_name]:
            if sample["filter"] != settings.filter:
                continue
            item = {"task": task.task_name, "doc_id": sample["doc_id"], "score": float(sample[settings.metric])}
            answers = sample["filtered_resps"]
            if answers and isinstance(answers[0], (list, tuple)):  # loglikelihood requests: (logprob, is_greedy)
                item["loglikelihoods"] = [float(answer[0]) for answer in answers]
            else:
                item["response"] = answers[0] if answers else ""
            items.append(item)
    return items


def _sandbox_outcome(
    spec: BenchmarkSpec, logged: dict[str, list[dict]], leaves: Sequence[Task], name: str, version: str
) -> Outcome:
    settings = spec.lm_eval
    programs: list[str] = []
    tests: list[str] = []
    items: list[dict] = []
    for task in leaves:
        for sample in logged[task.task_name]:
            if sample["filter"] != settings.filter:
                continue
            (candidates,) = sample["filtered_resps"]  # one request per doc
            programs.append(candidates[0])  # greedy, one sample: pass@1
            tests.append(sample["target"])
            items.append({"task": task.task_name, "doc_id": sample["doc_id"], "response": candidates[0]})
    if not programs:
        raise QuantbenchError(f"benchmark {spec.name}: lm-eval logged no samples for filter {settings.filter!r}")
    verdicts = sandbox.score_programs(programs, tests, spec.sandbox)
    passed = [1.0 if v.passed else 0.0 for v in verdicts]
    mean = sum(passed) / len(passed)
    stderr = mean_stderr(passed) if len(passed) > 1 else None
    counts = {s: sum(v.status == s for v in verdicts) for s in (sandbox.PASSED, sandbox.FAILED, sandbox.TIMEOUT)}
    details = {"isolation": sandbox.isolation(), "limits": spec.to_dict()["sandbox"], "counts": counts}
    items = [{**item, "score": score} for item, score in zip(items, passed)]
    return Outcome(score=mean, stderr=stderr, items=len(passed), task=name, task_version=version,
                   details={"sandbox": details, "per_item": items})

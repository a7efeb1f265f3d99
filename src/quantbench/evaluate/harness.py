"""Score one benchmark through lm-eval's Python API: the lm-eval model for a backend, ``simple_evaluate``,
the configured metric (or the generated programs scored in the sandbox).

Backends: ``hf`` wraps the model object of :func:`quantbench.checkpoint.load.load_model` (plain or simulated-
quantization checkpoints) in lm-eval's HFLM, whose greedy generations run through
:class:`quantbench.evaluate.generation.GreedyDecoder` (the tokens ``generate`` gives, several times faster
on a GPU); ``vllm`` is lm-eval's vLLM backend on the checkpoint path, where the vllm package is installed.
Prompts go through the model's chat template only where the benchmark says so (``chat_template``; the
published text tables use none); a BOS token is prepended where the tokenizer has one (``add_bos_token=True``).
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
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria
from lm_eval.tasks import TaskManager

from quantbench.evaluate import sandbox
from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import BenchmarkSpec, LmEvalSettings
from quantbench.evaluate.generation import GreedyDecoder, merged_generation_config
from quantbench.evaluate.results import Outcome
from quantbench.evaluate.tasks import builtin_task_manager, leaf_tasks, task_name, task_version
from quantbench.util.errors import QuantbenchError

log = logging.getLogger(__name__)


def make_lm(model_dir: str | Path, backend: Backend, settings: LmEvalSettings | None = None) -> LM:
    """The lm-eval model for ``model_dir`` on ``backend``; ``settings``' think_end_token, if any, makes it
    return only the reply after that marker."""
    reasoning = {"think_end_token": settings.think_end_token} if settings and settings.think_end_token else {}
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
            **reasoning,
            **backend.vllm_engine_options(),
        )
    model, tokenizer = backend.load(model_dir)
    return QuantbenchHFLM(
        pretrained=model, tokenizer=tokenizer, add_bos_token=True, batch_size=backend.batch_size, **reasoning
    )


class QuantbenchHFLM(HFLM):
    """lm-eval's HFLM with greedy generations on a GPU through :class:`GreedyDecoder`; sampling, settings the
    decoder does not reproduce, and models on other devices go to HFLM's own ``model.generate``.

    On the CPU ``generate`` stays: the decoder attends over the whole static cache, which changes the last
    bits of the attention sums, and the CPU's float32 results (the demo's) stay identical to earlier runs.
    """

    decoder_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - HFLM's signature
        super().__init__(*args, **kwargs)
        self.decoder = GreedyDecoder(self.model)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):  # noqa: ANN001, ANN201
        kwargs = dict(generation_kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        temperature = kwargs.pop("temperature", 0.0)  # as HFLM: temperature 0 without do_sample means greedy
        if kwargs.get("do_sample") is None and temperature == 0.0:
            kwargs["do_sample"] = False
        config = merged_generation_config(self.model, pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        greedy = not config.do_sample and all(hasattr(config, k) for k in kwargs) and self.mixed_precision_dtype is None
        if not greedy or context.device.type not in self.decoder_devices or not self.decoder.handles(config):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        criteria = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        return self.decoder.generate(
            context, attention_mask, max_length=max_length, generation_config=config, stopping_criteria=criteria
        )


def run_lm_eval(lm: LM, spec: BenchmarkSpec, root: Task | Group, *, source: str, limit: int | None = None) -> Outcome:
    """Evaluate ``root`` (built for ``spec``) with ``lm``; ``limit``: first N docs of each lm-eval task."""
    settings = spec.lm_eval
    leaves = leaf_tasks(root)
    samples = {t.task_name: list(range(min(limit, len(t.eval_docs)))) for t in leaves} if limit else None
    by_sandbox = settings.scorer == "sandbox"
    builtin = source == "hub" and settings.hub_task is not None
    manager = builtin_task_manager() if builtin else TaskManager(include_defaults=False)
    log.info(
        "%s: lm-eval task %s (%s), %d-shot, %s items",
        spec.name,
        task_name(root),
        source,
        settings.num_fewshot,
        "all" if limit is None else f"first {limit} per task",
    )
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
        scores=reported_scores(row),
        details={"per_item": per_item(spec, out["samples"], leaves)},
    )


def reported_scores(row: dict) -> dict[str, float]:
    """Every ``metric,filter`` score lm-eval reported for a task (stderrs left out), e.g. GSM8K's
    ``exact_match,strict-match`` and ``exact_match,flexible-extract``."""
    return {
        key: float(value)
        for key, value in row.items()
        if "," in key and "_stderr," not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


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
    return Outcome(
        score=mean,
        stderr=stderr,
        items=len(passed),
        task=name,
        task_version=version,
        details={"sandbox": details, "per_item": items},
    )

"""Vision-language benchmarks (MMMU, DocVQA, ChartQA): lmms-eval's tasks, or the project's offline scorer over local files.

- ``source="hub"``: lmms-eval's own task (``spec.lmms_eval.task``) and its Hub dataset, as the published
  runs scored them. lmms-eval is an optional dependency; without it this fails with a message naming
  the fix.
- ``source="local"``: the JSONL file ``spec.files[split]`` (records with ``image`` relative to the file,
  ``question`` and the answer fields of the benchmark's style), one greedy answer per record through
  the model's processor and chat template, scored by :mod:`quantbench.evaluate.vqa_metrics`:

  ``anls``     DocVQA: ``answers`` (list of references)
  ``relaxed``  ChartQA: ``answer``; ``type`` (``human_test`` / ``augmented_test``) splits are reported in details
  ``mmmu``     MMMU: ``answer``, ``question_type`` (``multiple-choice`` or ``open``), ``options``; the
               ``<image N>`` markers of the question are dropped (the image leads the user turn)
"""

from __future__ import annotations

import logging
import math
import random
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from quantbench import __version__
from quantbench.checkpoint.load import load_model
from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import BenchmarkSpec
from quantbench.evaluate.results import Outcome
from quantbench.evaluate.vqa_metrics import MMMU_SEED, anls, mmmu_score, option_letters, relaxed_correctness
from quantbench.model.vlm import image_text_inputs, load_processor, read_image_records
from quantbench.util.errors import QuantbenchError

log = logging.getLogger(__name__)

_IMAGE_MARKER = re.compile(r"<image \d+>\s*")


def question_prompt(spec: BenchmarkSpec, record: dict[str, Any]) -> str:
    """The user's text: ``prompt`` with the question, or ``choice_prompt`` with the question and lettered options."""
    settings = spec.lmms_eval
    question = _IMAGE_MARKER.sub("", str(record["question"])).strip()
    if record.get("question_type") == "multiple-choice":
        options = "\n".join(f"{letter}. {text}" for letter, text in option_letters(record["options"]).items())
        return settings.choice_prompt.format(question=question, options=options)
    return settings.prompt.format(question=question)


def _score(spec: BenchmarkSpec, record: dict[str, Any], answer: str, rng: random.Random) -> float:
    scorer = spec.lmms_eval.scorer
    if scorer == "anls":
        return anls(answer, [str(a) for a in record["answers"]])
    if scorer == "relaxed":
        return float(relaxed_correctness(answer, str(record["answer"])))
    return float(mmmu_score(record["question_type"], answer, record["answer"], record.get("options", []), rng))


def score_local(
    model_dir: str | Path, spec: BenchmarkSpec, data_dir: str | Path, backend: Backend, limit: int | None
) -> Outcome:
    """Greedy answers of the model in ``model_dir`` to the records of the benchmark's local file, scored (module docstring)."""
    settings = spec.lmms_eval
    path = spec.data_paths(data_dir)[settings.split]
    records = read_image_records(path)[:limit]
    model, _ = load_model(model_dir, device=backend.device, dtype=backend.torch_dtype)
    processor = load_processor(model_dir)
    rng = random.Random(MMMU_SEED)
    answers, scores, by_type = [], [], {}
    for record in tqdm(records, desc=spec.name, unit="item"):
        inputs = {
            k: v.to(backend.device)
            for k, v in image_text_inputs(processor, record["image"], question_prompt(spec, record)).items()
        }
        try:
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False)
        except Exception as exc:
            raise QuantbenchError(
                f"benchmark {spec.name}: the model failed on {record['image'].name} ({type(exc).__name__}: {exc})"
            ) from exc
        answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
        answers.append(answer)
        scores.append(_score(spec, record, answer, rng))
        if "type" in record:
            by_type.setdefault(str(record["type"]), []).append(scores[-1])
    mean = sum(scores) / len(scores)
    stderr = (
        math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1) / len(scores)) if len(scores) > 1 else None
    )
    return Outcome(
        score=mean,
        stderr=stderr,
        items=len(scores),
        task=f"quantbench.evaluate.vlm_eval:{settings.scorer}",
        task_version=__version__,
        details={
            "answers": answers,
            "scores": scores,
            "by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
            "max_new_tokens": settings.max_new_tokens,
        },
    )


# deploy/lmms_eval.sh of the published runs: lmms-eval's vllm model, requests batched by 16 (its `--batch_size`)
LMMS_EVAL_VLLM_BATCH_SIZE = 16
LMMS_EVAL_VLLM_GPU_MEMORY_UTILIZATION = 0.9


def lmms_eval_model(model_dir: str | Path, backend: Backend) -> tuple[str, str, int]:
    """lmms-eval's model name, ``model_args`` string and batch size for ``model_dir`` on ``backend``.

    ``vllm``: lmms-eval's vllm model as the published script ran it (GPU memory utilization 0.9, batch 16),
    with tensor parallelism from the backend (the sizing rule). Its checkpoint argument is ``model=`` (the
    script's ``model_version=`` is an older lmms-eval's name for it; lmms-eval 0.7 passes unknown
    keys on to ``vllm.LLM`` and loads its default model, Qwen2.5-VL-3B-Instruct, instead). ``hf``: lmms-eval's transformers wrapper
    of the model type, ``pretrained=``, one request at a time.
    """
    if backend.name == "vllm":
        options = {
            "model": Path(model_dir),
            "tensor_parallel_size": backend.tensor_parallel_size,
            "gpu_memory_utilization": LMMS_EVAL_VLLM_GPU_MEMORY_UTILIZATION,
            "dtype": backend.dtype,
            **backend.vllm_engine_options(),
        }
        return "vllm", ",".join(f"{key}={value}" for key, value in options.items()), LMMS_EVAL_VLLM_BATCH_SIZE
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).model_type, f"pretrained={model_dir}", 1


def lmms_eval_device(backend: Backend) -> str | None:
    """The ``device`` lmms-eval gets: none for its vllm model (it would hand it on to ``vllm.LLM``; vLLM's
    build decides the device), the backend's for the transformers wrappers."""
    return None if backend.name == "vllm" else backend.device


def score_lmms_eval(model_dir: str | Path, spec: BenchmarkSpec, backend: Backend, limit: int | None) -> Outcome:
    """lmms-eval's task on its Hub dataset, with lmms-eval's vllm model or its transformers wrapper of the model type."""
    settings = spec.lmms_eval
    try:
        from lmms_eval.evaluator import simple_evaluate
    except ImportError:
        raise QuantbenchError(
            f"benchmark {spec.name}: source 'hub' scores lmms-eval's task {settings.task!r}, but lmms-eval is not "
            "installed; `pip install lmms-eval` (it downloads the dataset from the Hub), or score the local files "
            "offline with --source local"
        ) from None
    model, model_args, batch_size = lmms_eval_model(model_dir, backend)
    results = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[settings.task],
        batch_size=batch_size,
        device=lmms_eval_device(backend),
        limit=limit,
    )
    task_results = results["results"][settings.task]
    key = f"{settings.metric},none"
    if key not in task_results:
        raise QuantbenchError(
            f"benchmark {spec.name}: lmms-eval's results for {settings.task!r} hold no {key!r} ({sorted(task_results)})"
        )
    stderr = task_results.get(f"{settings.metric}_stderr,none")
    return Outcome(
        score=float(task_results[key]),
        stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
        items=int(results.get("n-samples", {}).get(settings.task, {}).get("effective", 0)),
        task=settings.task,
        task_version=str(results.get("versions", {}).get(settings.task, "")),
        details={"lmms_eval_model": model, "model_args": model_args, "batch_size": batch_size},
    )

"""Run by the vLLM environment's python, not by pytest: build lmms-eval's ``vllm`` model for each checkpoint the
way ``lmms_eval.evaluator.simple_evaluate`` builds it, from the arguments quantbench produces
(:func:`quantbench.evaluate.vlm_eval.lmms_eval_model`), and record what vLLM was given, or the error.

Usage: ``python tests/lmms_eval_worker.py JOB.json OUT.json``; the job is ``{"models": {name: path}}``.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from lmms_eval import models

    from quantbench.evaluate.backend import Backend
    from quantbench.evaluate.vlm_eval import lmms_eval_device, lmms_eval_model

    with open(sys.argv[1], encoding="utf-8") as handle:
        job = json.load(handle)
    backend = Backend(name="vllm", device="cpu", tensor_parallel_size=1)
    results = {}
    for name, path in job["models"].items():
        model, model_args, batch_size = lmms_eval_model(path, backend)
        record = {"model": model, "model_args": model_args, "batch_size": batch_size}
        try:
            lm = models.get_model(model).create_from_arg_string(
                model_args, {"batch_size": batch_size, "max_batch_size": None, "device": lmms_eval_device(backend)}
            )
        except Exception as exc:  # noqa: BLE001 - recorded: the test decides which failures are expected
            record["error"] = f"{type(exc).__name__}: {exc}"
        else:
            engine = lm.client.llm_engine
            record |= {
                "class": f"{type(lm).__module__}.{type(lm).__name__}",
                "loaded": engine.model_config.model,
                "tensor_parallel_size": engine.vllm_config.parallel_config.tensor_parallel_size,
                "batch_size_per_gpu": lm.batch_size_per_gpu,
                "dtype": str(engine.model_config.dtype),
            }
            del lm
        results[name] = record
        print(name, record, flush=True)
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()

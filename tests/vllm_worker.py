"""Run by the vLLM environment's python (``.venv-vllm``), not by pytest: load checkpoints in vLLM one after the
other in this one process and write each one's teacher-forced log-probs, or the error that stopped its load.

Usage: ``python tests/vllm_worker.py JOB.json OUT.json``. The job is ``{"dtype": ..., "models": [{"name", "path",
"prompts": [[token ids]], "dump": optional path}]}``. ``dump``: also record, for the first prompt, every quantized
linear's input and output and vLLM's own int8 codes and scales of that input (``torch.save``d there). The result
also names vLLM's platform (``cpu`` for its CPU build).

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``) and eagerly: no
engine process per model to spawn and no graph capture, which makes a load take seconds instead of a minute on
two cores. Models are loaded in the order given; one whose load fails is recorded and the next is loaded.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback


def _hook_quantized_linears(model, records: dict) -> list:
    """Forward hooks on every linear vLLM runs with a quantization scheme; the first call of each is recorded."""
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    quantize = ops.onednn_scaled_int8_quant if current_platform.is_cpu() else ops.scaled_int8_quant
    handles = []
    for name, module in model.named_modules():
        if getattr(module, "scheme", None) is None or not hasattr(module, "weight_scale"):
            continue

        def record(module, inputs, output, name=name):
            if name in records:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).contiguous()
            codes, scales, _ = quantize(x, None, None, True)
            y = output[0] if isinstance(output, tuple) else output
            records[name] = {
                "x": x.clone(),
                "y": y.detach().clone(),
                "codes": codes,
                "scales": scales,
                "scheme": type(module.scheme).__name__,
            }

        handles.append(module.register_forward_hook(record))
    return handles


def _score(llm, prompts: list[list[int]]) -> list[list[float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
        use_tqdm=False,
    )
    return [
        [out.prompt_logprobs[i][token].logprob for i, token in enumerate(prompt) if i > 0]
        for prompt, out in zip(prompts, outputs)
    ]


def _run(item: dict, dtype: str) -> dict:
    import torch
    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(
        model=item["path"],
        dtype=dtype,
        max_model_len=1024,
        enforce_eager=True,
        seed=0,
        distributed_executor_backend="uni",
    )
    result = {"load_s": round(time.perf_counter() - started, 2)}
    try:
        if item.get("dump"):
            records: dict = {}
            handles = llm.apply_model(lambda model: _hook_quantized_linears(model, records))[0]
            _score(llm, item["prompts"][:1])
            for handle in handles:
                handle.remove()
            torch.save(records, item["dump"])
            result["dumped"] = sorted(records)
        started = time.perf_counter()
        result["logprobs"] = _score(llm, item["prompts"])
        result["score_s"] = round(time.perf_counter() - started, 2)
    finally:
        del llm
    return result


def main() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.platforms import current_platform

    with open(sys.argv[1], encoding="utf-8") as handle:
        job = json.load(handle)
    results = {"platform": current_platform.device_type}
    for item in job["models"]:
        try:
            results[item["name"]] = _run(item, job["dtype"])
        except Exception as exc:  # noqa: BLE001 - recorded: the test decides which failures are the CPU build's known limits
            results[item["name"]] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-4000:],
            }
        cleanup_dist_env_and_memory()
        gc.collect()
        print(
            item["name"],
            {k: v for k, v in results[item["name"]].items() if k in ("load_s", "score_s", "error")},
            flush=True,
        )
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()

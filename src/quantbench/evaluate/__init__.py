"""Evaluation: the published benchmarks through lm-eval's Python API, offline or from the hub, plus
WikiText-2 perplexity and the vision-language scorers.

Modules: ``benchmarks`` (specs from the benchmarks file), ``tasks`` (lm-eval tasks: built-in or the
local twins in ``tasks/*.yaml``), ``backend`` (hf or vllm, device, dtype, batch), ``harness`` (lm-eval
models, ``simple_evaluate``), ``generation`` (greedy decoding with a static cache), ``sandbox`` (HumanEval
programs), ``answer_check`` and ``olympiadbench`` (OlympiadBench's answers), ``perplexity``, ``vlm_eval``
and ``vqa_metrics`` (lmms-eval, or quantbench's own scorer), ``results`` (provenance) and ``runner``
(``evaluate_benchmark``, the step the workflow runs). This package root imports nothing heavy, so reading
benchmark specs stays cheap.
"""

"""Evaluation: the published benchmarks through lm-eval's Python API, offline or from the hub, plus
WikiText-2 perplexity.

Modules: ``benchmarks`` (specs from config/benchmarks.yaml), ``tasks`` (lm-eval tasks: built-in or the
local twins in ``tasks/*.yaml``), ``harness`` (backends, ``simple_evaluate``), ``sandbox`` (HumanEval
programs), ``perplexity``, ``results`` (provenance) and ``runner`` (``evaluate_benchmark``, the step the
workflow runs). This package root imports nothing heavy, so reading benchmark specs stays cheap.
"""

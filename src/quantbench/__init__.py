"""quantbench: reproduce LLM quantization benchmark tables (calibrate, quantize, evaluate, tabulate).

Packages, from the workflow down (none imports Snakemake; the workflow's rules call them through thin scripts):

- ``run``: the run configuration (the one reader of the workflow config), job sizing, recipe departures;
- ``report``: tables, per-cell results, the comparison with published numbers, the docs page;
- ``evaluate``: benchmarks through lm-eval and lmms-eval, perplexity, the evaluate step;
- ``quant``: schemes, the algorithms (rtn, gptq, awq), numerics and kernels, the layer-by-layer pipeline and
  the quantize step;
- ``calibration``: calibration sets turned into tokenized samples;
- ``checkpoint``: a model's files: download, safetensors checks, preflight, export, loading back;
- ``model``: architectures, mixture-of-experts layers, vision-language models;
- ``util``: errors, atomic writes, JSONL, job logs, provenance, spec files.

``cli`` is the ``quantbench`` command line.
"""

__version__ = "0.1.0"

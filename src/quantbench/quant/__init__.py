"""Quantization: schemes as data, the algorithms, their numerics and kernels, and the layer-by-layer pipeline.

- what to do: ``schemes`` (a scheme's weights, input activations, algorithm and its parameters, rounding,
  dtype, targets) and ``algorithms`` (RTN, GPTQ and AWQ, one object each, registered by name: what the
  pipeline and the sizing rule ask of an algorithm);
- numerics: ``qdq`` (integer and fp8 quantize-dequantize), ``observers`` (a linear's input statistics),
  ``linear`` (``QuantLinear``, which simulates a scheme exactly), ``rtn``, ``gptq`` and ``awq``;
- kernels, each with a torch twin: ``qdq_kernel``, ``norm_kernel``, ``gptq_kernel`` (Triton, loaded through
  ``triton_support``);
- the pipeline: ``sequential`` (one block at a time on the calibration activations it sees), ``capture``
  (recorded module calls), ``prefetch`` (blocks to and from the device), ``resume`` (per-layer progress),
  ``stats`` (what a run reports) and ``quantize`` (a model or a checkpoint under a scheme: the quantize step).

``schemes`` and ``algorithms`` import no torch (the workflow's DAG build reads them).
"""

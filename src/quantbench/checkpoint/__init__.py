"""A model's files on disk, from the Hub to the quantized checkpoint and back.

``download`` (:class:`~quantbench.checkpoint.download.ModelSource` and fetching it), ``weightfiles``
(safetensors files checked from their headers), ``preflight`` (a job's disk and memory need against what
the machine has), ``export`` (writing the compressed-tensors checkpoint), ``load`` (loading a model
directory back, a quantized one as a model that simulates its scheme: quantbench's runtime) and
``serving`` (what vLLM runs for a checkpoint's quantization config, and what it refuses).
"""

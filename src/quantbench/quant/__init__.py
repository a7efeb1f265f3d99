"""Quantization algorithms and the modules they produce (qdq numerics, QuantLinear, rtn, gptq, awq, sequential)."""

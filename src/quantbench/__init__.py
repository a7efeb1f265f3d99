"""quantbench: reproduce LLM quantization benchmark tables (calibrate, quantize, evaluate, tabulate)."""

__version__ = "0.1.0"

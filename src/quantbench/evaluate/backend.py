"""Where and how a model runs for evaluation: backend (hf or vllm), device, dtype, batch size, threads.

Plain data at import (torch loads when a model does), so the run config holds a :class:`Backend` (the
``evaluation.backend`` section) and the workflow's DAG build reads it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantbench.util.errors import QuantbenchError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Backend:
    """How the model runs: backend name, device, dtype, batch size, CPU threads (hf; None: torch's
    default), tensor-parallel size (vllm)."""

    name: str = "hf"
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 8
    threads: int | None = None
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise QuantbenchError(f"unknown backend {self.name!r}; use one of {', '.join(BACKENDS)}")
        if self.batch_size < 1 or self.tensor_parallel_size < 1 or (self.threads is not None and self.threads < 1):
            raise QuantbenchError("batch_size, threads and tensor_parallel_size must be >= 1")

    def load(self, model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and tokenizer of ``model_dir`` through quantbench's runtime, with ``threads`` applied."""
        import torch

        from quantbench.checkpoint.load import load_model

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return load_model(model_dir, device=self.device, dtype=self.torch_dtype)

    def vllm_engine_options(self) -> dict[str, bool]:
        """vLLM engine options beyond the published settings: on a CPU (vLLM's CPU build) the model runs
        eagerly, since capturing its graph takes about a minute per engine start on two cores."""
        return {"enforce_eager": True} if self.device == "cpu" else {}

    @property
    def torch_dtype(self) -> torch.dtype:
        """``auto``: float32 on CPU (bf16 matmuls are slow there), bfloat16 on accelerators."""
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        value = getattr(torch, self.dtype, None)
        if not isinstance(value, torch.dtype):
            raise QuantbenchError(f"unknown dtype {self.dtype!r}; use auto, float32, bfloat16 or float16")
        return value

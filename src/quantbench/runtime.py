"""Load a model directory (plain Hugging Face or quantbench's compressed-tensors export) for evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quantbench.errors import QuantbenchError

log = logging.getLogger(__name__)


def load_model(
    path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer in ``path`` onto ``device``, in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise QuantbenchError(f"{path} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer

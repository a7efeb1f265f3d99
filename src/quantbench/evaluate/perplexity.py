"""WikiText-2 perplexity, the GPTQ/AWQ protocol: the test split's rows joined with blank lines
(``"\\n\\n".join(rows)``), tokenized once with the tokenizer's defaults, cut into non-overlapping windows
of ``seq_len`` tokens (the incomplete tail dropped), each window scored on its own; the perplexity is
exp of the mean negative log-likelihood over every predicted token (``seq_len - 1`` per window).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quantbench.util.errors import QuantbenchError


def read_rows(path: str | Path, field: str = "text") -> list[str]:
    """The ``field`` of every row of a JSONL file (the HF wikitext rows, blank rows included)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)[field] for line in handle]


@dataclass(frozen=True)
class Perplexity:
    """A perplexity and what it was measured on: windows scored, tokens predicted."""

    perplexity: float
    windows: int
    predicted_tokens: int


@torch.no_grad()
def wikitext_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    seq_len: int,
    max_tokens: int | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on ``texts`` joined with blank lines, in windows of ``seq_len`` tokens.

    ``max_tokens``: score only the windows within the first ``max_tokens`` tokens (None: all).
    """
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = ids.numel() // seq_len
    if windows == 0:
        raise QuantbenchError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    for i in tqdm(range(windows), desc="perplexity", unit="window"):
        window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0).to(device)
        logits = model(window).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").double().cpu()
    predicted = windows * (seq_len - 1)
    mean = total.item() / predicted
    if not math.isfinite(mean):
        raise QuantbenchError(f"perplexity is not finite (mean NLL {mean}); the model produced inf/NaN logits")
    return Perplexity(math.exp(mean), windows, predicted)

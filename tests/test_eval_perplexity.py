"""WikiText-2 perplexity: the protocol against an independent computation, and the demo subset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quantbench.checkpoint.load import load_model
from quantbench.evaluate.perplexity import read_rows, wikitext_perplexity
from quantbench.util.errors import QuantbenchError

ROOT = Path(__file__).resolve().parents[1]
DEMO_ROWS = ROOT / "resources" / "data" / "wikitext2" / "test.jsonl"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_tokenizer(dense_model_dir: Path):
    torch.manual_seed(0)
    return load_model(dense_model_dir, dtype=torch.float32)


def test_perplexity_is_exp_mean_nll_of_nonoverlapping_windows(model_and_tokenizer) -> None:
    """Same number as transformers' own loss (labels=input) averaged over the same windows."""
    model, tokenizer = model_and_tokenizer
    rows = read_rows(DEMO_ROWS)
    result = wikitext_perplexity(model, tokenizer, rows, seq_len=512, max_tokens=4096)
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in ids[:4096].split(512)]
    assert (result.windows, result.predicted_tokens) == (8, 8 * 511)
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 8), rel=1e-6)
    assert 300 < result.perplexity < 600  # the demo model on out-of-domain Wikipedia text


@pytest.mark.slow
def test_demo_subset_gives_the_full_test_split_perplexity(model_and_tokenizer, shared_dir: Path) -> None:
    model, tokenizer = model_and_tokenizer
    full = read_rows(shared_dir / "data" / "wikitext2" / "test.jsonl")
    demo = read_rows(DEMO_ROWS)
    assert demo == full[: len(demo)]
    a = wikitext_perplexity(model, tokenizer, demo, seq_len=512, max_tokens=4096)
    b = wikitext_perplexity(model, tokenizer, full, seq_len=512, max_tokens=4096)
    assert a == b


def test_incomplete_tail_window_is_dropped(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    rows = read_rows(DEMO_ROWS)
    assert wikitext_perplexity(model, tokenizer, rows, seq_len=512, max_tokens=1500).windows == 2


def test_text_shorter_than_a_window_is_an_error(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    with pytest.raises(QuantbenchError, match="fewer than one window"):
        wikitext_perplexity(model, tokenizer, ["A short text."], seq_len=512)

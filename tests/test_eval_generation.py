"""Greedy generation through GreedyDecoder gives exactly the tokens of transformers' generate, on the trained
fixture: left-padded batches, end-of-sequence padding, lm-eval's stop sequences, a simulated-quantization
model, and lm-eval's generate_until strings through the hf backend's HFLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantbench.checkpoint.load import share_input_quantizations
from quantbench.evaluate.generation import GreedyDecoder, merged_generation_config
from quantbench.evaluate.harness import QuantbenchHFLM
from quantbench.model.architectures import replace_module
from quantbench.quant import linear as quant_linear
from quantbench.quant.rtn import rtn_quantize_linear
from quantbench.quant.schemes import load_schemes

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "resources" / "models" / "tinyqwen3-dense"
GSM8K = ROOT / "resources" / "data" / "gsm8k" / "test.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(FIXTURE)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def questions() -> list[str]:
    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]
    return [f"Question: {row['question']}\nAnswer:" for row in rows]


def batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def generate_both(model, ids, mask, max_length, criteria_factory=None, **config_kwargs):
    """(generate's output, the decoder's output) for the same request."""
    config = merged_generation_config(model, do_sample=False, **config_kwargs)
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=mask, max_length=max_length, generation_config=config,
            stopping_criteria=criteria_factory() if criteria_factory else None,
        )  # fmt: skip
    decoder = GreedyDecoder(model, cache_multiple=64, check_every=5)
    got = decoder.generate(
        ids, mask, max_length=max_length, generation_config=config,
        stopping_criteria=criteria_factory() if criteria_factory else None,
    )  # fmt: skip
    return expected, got


def test_left_padded_batch_gives_generates_tokens(model, tokenizer, questions) -> None:
    ids, mask = batch(tokenizer, questions[:5])
    assert (mask == 0).any(), "the batch must mix prompt lengths (left padding)"
    expected, got = generate_both(model, ids, mask, ids.shape[1] + 40, pad_token_id=tokenizer.pad_token_id)
    assert expected.shape == (5, ids.shape[1] + 40)
    assert torch.equal(got, expected)


def test_end_of_sequence_pads_finished_rows_and_stops_when_all_are(model, tokenizer, questions) -> None:
    ids, mask = batch(tokenizer, questions[5:9])
    free, _ = generate_both(model, ids, mask, ids.shape[1] + 30, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    new = free[:, ids.shape[1] :]
    # a token that row 0 emits early and every row emits somewhere: an end-of-sequence token ends all rows
    eos = next(int(t) for t in new[0] if all(int(t) in row.tolist() for row in new))
    expected, got = generate_both(
        model, ids, mask, ids.shape[1] + 30, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    assert expected.shape[1] < free.shape[1], "the end-of-sequence token should end generation early"
    assert (expected == tokenizer.pad_token_id).any()
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_lm_eval_stop_sequences_end_generation_at_the_same_step(model, tokenizer, questions) -> None:
    ids, mask = batch(tokenizer, questions[9:13])
    free, _ = generate_both(model, ids, mask, ids.shape[1] + 40, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(free[:, ids.shape[1] :])
    stop = [texts[0][8:12], texts[1][4:7]]  # strings the rows really produce
    assert all(stop)

    def criteria():
        return stop_sequences_criteria(tokenizer, stop, ids.shape[1], ids.shape[0])

    expected, got = generate_both(model, ids, mask, ids.shape[1] + 40, criteria, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(got, expected)


def simulated(scheme_name: str, dtype: torch.dtype):
    """The fixture with every decoder linear replaced by the runtime's QuantLinear (round to nearest)."""
    quantized = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=dtype).eval()
    scheme = load_schemes(ROOT / "config" / "schemes.yaml")[scheme_name]
    with torch.no_grad():
        for name, module in list(quantized.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                replace_module(quantized, name, rtn_quantize_linear(module, scheme))
    return quantized


@pytest.mark.parametrize(
    ("scheme", "quantizer"),
    [("FP8-Dynamic", "fake_quantize_input"), ("INT8-Dynamic", "input_codes")],  # W8A8 shares the int8 codes
)
def test_linears_sharing_an_input_quantize_it_once_with_the_same_logits(
    tokenizer, questions, monkeypatch, scheme, quantizer
) -> None:
    quantized = simulated(scheme, torch.float32)
    ids, mask = batch(tokenizer, questions[:3])
    calls = []
    original = getattr(quant_linear, quantizer)
    monkeypatch.setattr(quant_linear, quantizer, lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        alone = quantized(ids, attention_mask=mask).logits
        per_forward = len(calls)
        assert share_input_quantizations(quantized) == 2 * quantized.config.num_hidden_layers  # q/k/v, gate/up
        calls.clear()
        shared = quantized(ids, attention_mask=mask).logits
    assert per_forward == 7 * quantized.config.num_hidden_layers
    assert len(calls) == 4 * quantized.config.num_hidden_layers
    assert torch.equal(shared, alone)


@pytest.mark.slow
def test_simulated_quantization_model_decodes_like_generate(model, tokenizer, questions) -> None:
    """INT8-Dynamic: QuantLinear with per-token activation quantize-dequantize in every decode step.

    In float64: in float32 the int8 rounding of the activations turns the last-bit differences of the
    attention sums (the static cache is longer than generate's) into other tokens now and then.
    """
    quantized = simulated("INT8-Dynamic", torch.float64)
    share_input_quantizations(quantized)
    ids, mask = batch(tokenizer, questions[13:17])
    expected, got = generate_both(quantized, ids, mask, ids.shape[1] + 32, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(got, expected)
    plain, _ = generate_both(model.double(), ids, mask, ids.shape[1] + 32, pad_token_id=tokenizer.pad_token_id)
    model.float()
    assert not torch.equal(plain, expected), "the quantized model should generate differently somewhere"


@pytest.mark.slow
def test_hf_backend_generate_until_strings_are_unchanged(model, tokenizer, questions) -> None:
    """lm-eval's generate_until through the hf backend's HFLM against lm-eval's own HFLM, GSM8K settings."""
    gen_kwargs = {"until": ["Question:", "</s>", "<|im_end|>", "\n\n"], "do_sample": False, "temperature": 0.0,
                  "max_gen_toks": 48}  # fmt: skip
    requests = [
        Instance(request_type="generate_until", doc={}, arguments=(questions[i], dict(gen_kwargs)), idx=0)
        for i in range(6)
    ]
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).generate_until(requests, disable_tqdm=True)
    ours = QuantbenchHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    ours.decoder_devices = ("cpu",)  # the hf backend decodes through it on GPUs only
    assert ours.generate_until(requests, disable_tqdm=True) == plain
    assert ours.decoder._session is not None, "the greedy requests should have run through the decoder"
    assert any(text.strip() for text in plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decoding_gives_generates_tokens(tokenizer, questions) -> None:
    """On a GPU the decode steps are CUDA-graph replays with fused norms; in float32 the tokens stay generate's."""
    gpu = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval().to("cuda")
    ids, mask = batch(tokenizer, questions[:6])
    ids, mask = ids.cuda(), mask.cuda()
    config = merged_generation_config(gpu, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    decoder = GreedyDecoder(gpu, check_every=7)
    for new in (40, 24):  # the second batch reuses the first one's session and graph
        with torch.no_grad():
            expected = gpu.generate(ids, attention_mask=mask, max_length=ids.shape[1] + new, generation_config=config)
        got = decoder.generate(ids, mask, max_length=ids.shape[1] + new, generation_config=config)
        assert torch.equal(got, expected)
    assert decoder._session.graph is not None

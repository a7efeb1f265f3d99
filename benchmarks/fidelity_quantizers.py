"""Held-out perplexity and per-layer output errors of quantizer variants on the trained fixtures (docs/fidelity.md).

Families of variants (``--family``):

- ``awq``: the AWQ styles (``quantbench``, ``angelslim``) against RTN with the same asymmetric int4 weights,
  AngelSlim's rounding and fp16 on top (the seed's INT4-AWQ); ``--no-router-compensation`` runs quantbench's
  style as it was before it scaled MoE routers;
- ``fp8``: FP8-Dynamic and FP8-Static as vLLM serves MoE experts (per-tensor input scales shared by a layer's
  experts) and as each expert on its own would run them (quantbench's simulation before);
- ``int8``: INT8-Dynamic weights rounded by compressed-tensors' formula and by AngelSlim's, on the model in bf16
  (AngelSlim's division in the weight's dtype is a no-op in float32).

Each variant quantizes a fresh copy of a fixture (tinyqwen3-dense, int4 group 128; tinyqwen3-moe, group 64: its
experts' 192 inputs) on the tests' calibration split (even records of data/calib/gutenberg_heldout.jsonl,
16 samples x 256 tokens), then is scored on held-out text (the odd records, 187k tokens, none calibrated on):

- perplexity over the first ``--eval-tokens`` tokens in 512-token windows (the tests' 8,192 tokens are too
  few to rank AWQ variants: their perplexities differ by less than the window-to-window noise);
- per-layer relative output error ``sum |y_q - y|^2 / sum |y|^2`` over the first 4096 held-out tokens (eight
  512-token windows), two ways: *isolated* (the quantized layer on the unquantized model's inputs to that
  layer) and *accumulated* (the quantized model's hidden state after the layer against the unquantized model's).

    PYTHONPATH=src python benchmarks/fidelity_quantizers.py --family awq --fixture tinyqwen3-dense --out /tmp/awq.json

CPU only is fine (one core: a few minutes per float32 variant, about 15 for an fp16 or bf16 one).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantbench.calibration.samples import tokenize_calibration
from quantbench.evaluate.perplexity import wikitext_perplexity
from quantbench.quant import awq
from quantbench.quant.quantize import quantize_model
from quantbench.quant.schemes import load_schemes, parse_scheme

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ANGELSLIM_AWQ_ROUNDING = {"asymmetric_range": "minmax", "divide_in": "weight_dtype"}


@dataclass(frozen=True)
class Variant:
    """One quantization to measure: its scheme mapping (None: unquantized), the dtype the model loads in, and a
    context that changes a behaviour for the run (what quantbench did before)."""

    scheme: dict[str, Any] | None
    dtype: torch.dtype = torch.float32
    context: Callable[[], AbstractContextManager] = nullcontext


def _unscaled_routers() -> AbstractContextManager:
    apply = awq.apply_scales
    return mock.patch.object(
        awq, "apply_scales", lambda prev, linears, scales, unquantized=(): apply(prev, linears, scales)
    )


def _experts_on_their_own() -> AbstractContextManager:
    return mock.patch("quantbench.model.experts.moe_input_args", lambda _linear: None)


def variants(family: str, group_size: int, router_compensation: bool) -> dict[str, Variant]:
    """The variants of ``family`` by name."""
    schemes = {name: s.to_dict() for name, s in load_schemes(REPO / "config" / "schemes.yaml").items()}
    for raw in schemes.values():
        raw.pop("name")
    if family == "fp8":
        return {
            "unquantized": Variant(None),
            "FP8-Dynamic, experts share per-tensor scales (vLLM)": Variant(schemes["FP8-Dynamic"]),
            "FP8-Dynamic, each expert per token (quantbench before)": Variant(
                schemes["FP8-Dynamic"], context=_experts_on_their_own
            ),
            "FP8-Static, experts share the largest scale (vLLM)": Variant(schemes["FP8-Static"]),
            "FP8-Static, each expert its own scale (quantbench before)": Variant(
                schemes["FP8-Static"], context=_experts_on_their_own
            ),
        }
    if family == "int8":
        angelslim = {**schemes["INT8-Dynamic"], "rounding": {"symmetric_scale": "qmax", "divide_in": "weight_dtype"}}
        return {
            "unquantized (bf16)": Variant(None, torch.bfloat16),
            "INT8-Dynamic, absmax/127.5 (compressed-tensors)": Variant(schemes["INT8-Dynamic"], torch.bfloat16),
            "INT8-Dynamic, absmax/127 divided in bf16 (AngelSlim)": Variant(angelslim, torch.bfloat16),
        }
    weights = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": group_size, "symmetric": False}
    style = {"algorithm": "awq", "awq": {"style": "angelslim"}}
    quantbench = Variant(
        {"weights": weights, "algorithm": "awq"}, context=nullcontext if router_compensation else _unscaled_routers
    )
    return {
        "unquantized": Variant(None),
        "RTN": Variant({"weights": weights, "algorithm": "rtn"}),
        "quantbench": quantbench,
        "quantbench, no duo scaling": Variant({"weights": weights, "algorithm": "awq", "awq": {"duo_scaling": False}}),
        "angelslim": Variant({"weights": weights, **style}),
        "angelslim + AngelSlim rounding": Variant({"weights": weights, **style, "rounding": ANGELSLIM_AWQ_ROUNDING}),
        "angelslim + AngelSlim rounding + fp16 (seed)": Variant({"weights": weights, **style, "rounding": ANGELSLIM_AWQ_ROUNDING,
                                                                 "dtype": "float16"}),
    }  # fmt: skip


def record_layers(model: nn.Module, ids: torch.Tensor) -> tuple[list[tuple[tuple, dict]], list[torch.Tensor]]:
    """Each decoder layer's call (args, kwargs) and output on ``ids``."""
    calls, outputs, handles = [], [], []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True))
        handles.append(
            layer.register_forward_hook(lambda _m, _a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        )
    with torch.no_grad():
        model(ids, use_cache=False)  # no KV cache: replaying a layer must not append to the recorded one
    for handle in handles:
        handle.remove()
    return calls, outputs


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).square().sum() / b.float().square().sum())


def layer_errors(model: nn.Module, reference: tuple[list, list], ids: torch.Tensor) -> tuple[list[float], list[float]]:
    """(isolated, accumulated) relative output error per layer against the unquantized ``reference``."""
    calls, outputs = reference
    dtype = next(model.parameters()).dtype
    isolated = []
    with torch.no_grad():
        for layer, (args, kwargs), expected in zip(model.model.layers, calls, outputs):
            args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
            kwargs = {k: tuple(t.to(dtype) for t in v) if k == "position_embeddings" else v for k, v in kwargs.items()}
            out = layer(*args, **kwargs)
            isolated.append(relative(out[0] if isinstance(out, tuple) else out, expected))
    _, quantized = record_layers(model, ids)
    return isolated, [relative(q, e) for q, e in zip(quantized, outputs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="awq", choices=["awq", "fp8", "int8"])
    parser.add_argument("--fixture", default="tinyqwen3-dense", choices=["tinyqwen3-dense", "tinyqwen3-moe"])
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument(
        "--no-router-compensation", action="store_true", help="awq: quantbench's style without scaling routers"
    )
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = SHARED / "models" / args.fixture
    records = (SHARED / "data" / "calib" / "gutenberg_heldout.jsonl").read_text(encoding="utf-8").splitlines()
    calib_file = Path(f"/tmp/fidelity_calib_{args.family}_{args.fixture}.jsonl")
    calib_file.write_text("\n".join(records[0::2]) + "\n", encoding="utf-8")
    texts = [json.loads(line)["text"] for line in records[1::2]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = tokenize_calibration(tokenizer, calib_file, 16, 256, seed=0)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0, :4096].reshape(8, 512)  # 512-token windows

    def fresh(dtype: torch.dtype) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    references = {}
    results = {}
    for name, variant in variants(
        args.family, 64 if "moe" in args.fixture else 128, not args.no_router_compensation
    ).items():
        if args.only and name not in args.only:
            continue
        if variant.dtype not in references:
            references[variant.dtype] = record_layers(fresh(variant.dtype), ids)
        model, start = fresh(variant.dtype), time.perf_counter()
        with variant.context():
            if variant.scheme is not None:
                quantize_model(model, parse_scheme(name, variant.scheme), calibration, device="cpu")
            seconds = time.perf_counter() - start
            ppl = wikitext_perplexity(model, tokenizer, texts, seq_len=512, max_tokens=args.eval_tokens).perplexity
            isolated, accumulated = layer_errors(model, references[variant.dtype], ids)
        results[name] = {"perplexity": ppl, "isolated": isolated, "accumulated": accumulated, "seconds": seconds}
        print(f"{name}: perplexity {ppl:.3f}  isolated {[round(e, 5) for e in isolated]}  "
              f"accumulated {[round(e, 5) for e in accumulated]}  ({seconds:.0f} s)", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""What each published-recipe option (docs/fidelity.md) changes on the trained fixtures: static input scales,
per-layer errors and held-out perplexity, quantbench's choice against the recipe's, one option at a time.

    PYTHONPATH=src python benchmarks/fidelity_effects.py --samples 16 --seq-len 2048 --out /tmp/fidelity.json

Calibrates the dense fixture (tinyqwen3-dense) and the MoE fixture (tinyqwen3-moe) on a published ShareGPT
calibration file, quantizes FP8-Static and INT4-GPTQ under each setting and scores perplexity on held-out
Gutenberg text (every 18th odd record of data/calib/gutenberg_heldout.jsonl, as the tests do; 8,192 tokens
in 512-token windows). Prints one line per measurement and keeps them all in the JSON file. CPU only;
about two hours on two busy cores with the defaults (docs/fidelity.md has the numbers). The int4 group
size is 64 (the MoE experts' 192 inputs are no multiple of 128).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from quantbench.calibration.samples import Calibration, tokenize_calibration
from quantbench.calibration.stream import StreamSpec
from quantbench.evaluate.perplexity import wikitext_perplexity
from quantbench.quant.algorithms import GPTQParams
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_model
from quantbench.quant.schemes import CalibrationParams, Scheme, load_schemes

REPO = Path(__file__).resolve().parents[1]
QUANTBENCH = StreamSpec()
ANGELSLIM = StreamSpec(selection="first-n", format="angelslim", padding="max-length-unmasked")


def scheme(name: str, **changes: object) -> Scheme:
    base = load_schemes(REPO / "config" / "schemes.yaml")[name]
    if base.weights.group_size:
        base = dataclasses.replace(base, weights=dataclasses.replace(base.weights, group_size=64))
    return dataclasses.replace(base, **changes)


def input_scales(model: torch.nn.Module) -> dict[str, float]:
    return {
        n: float(m.input_scale)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.input_scale is not None
    }


def run(model_dir: Path, texts: list[str], tokenizer, calibration: Calibration, chosen: Scheme) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = time.perf_counter()
    stats = quantize_model(model, chosen, calibration, device="cpu")
    ppl = wikitext_perplexity(model, tokenizer, texts, seq_len=512, max_tokens=8192).perplexity
    return {
        "perplexity": ppl,
        "layer_errors": [layer.rel_error for layer in stats.layers],
        "input_scales": input_scales(model),
        "fallbacks": stats.fallbacks,
        "seconds": time.perf_counter() - start,
    }


def ratios(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    values = sorted(b[k] / a[k] for k in a)
    return {
        "min": values[0],
        "median": values[len(values) // 2],
        "max": values[-1],
        "changed": sum(v != 1.0 for v in values),
        "of": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument(
        "--data", type=Path, default=REPO / "resources" / "calib" / "sharegpt_gpt4-qwen3_a22B_output.jsonl"
    )
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--moe-seq-len", type=int, default=1024)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    records = (args.shared / "data" / "calib" / "gutenberg_heldout.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in records[1::2][::18]]
    results: dict[str, object] = {
        "samples": args.samples,
        "seq_len": args.seq_len,
        "moe_seq_len": args.moe_seq_len,
        "data": args.data.name,
    }

    def report(key: str, value: object) -> None:
        results[key] = value
        print(key, json.dumps(value, default=float), flush=True)
        args.out.write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")

    # dense: the stream, each of its options alone, full-precision propagation, GPTQ's edge cases
    model_dir = args.shared / "models" / "tinyqwen3-dense"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    streams = {
        "quantbench": QUANTBENCH,
        "angelslim": ANGELSLIM,
        "padding-only": StreamSpec(padding="max-length-unmasked"),
        "format-only": StreamSpec(format="angelslim"),
        "first-n-only": StreamSpec(selection="first-n"),
    }
    calibs = {
        k: tokenize_calibration(tokenizer, args.data, args.samples, args.seq_len, stream=s) for k, s in streams.items()
    }
    for key, calib in calibs.items():
        report(
            f"dense/calibration/{key}",
            {"real_tokens": int(calib.attention_mask.sum()), "statistics_positions": calib.num_tokens},
        )
    report(
        "dense/bf16",
        {"perplexity": run(model_dir, texts, tokenizer, calibs["quantbench"], Scheme(name="BF16"))["perplexity"]},
    )
    fp8 = {k: run(model_dir, texts, tokenizer, calibs[k], scheme("FP8-Static")) for k in streams}
    for key, value in fp8.items():
        report(
            f"dense/FP8-Static/{key}",
            {
                "perplexity": value["perplexity"],
                "scale_ratio_to_quantbench": ratios(fp8["quantbench"]["input_scales"], value["input_scales"]),
            },
        )
    full = run(
        model_dir,
        texts,
        tokenizer,
        calibs["angelslim"],
        scheme("FP8-Static", calibration=CalibrationParams(propagation="full-precision")),
    )
    report(
        "dense/FP8-Static/angelslim+full-precision",
        {
            "perplexity": full["perplexity"],
            "scale_ratio_to_quantized_propagation": ratios(fp8["angelslim"]["input_scales"], full["input_scales"]),
        },
    )
    gptq = {
        k: run(model_dir, texts, tokenizer, calibs[k], scheme("INT4-GPTQ"))
        for k in ("quantbench", "angelslim", "padding-only")
    }
    for key, value in gptq.items():
        report(f"dense/INT4-GPTQ/{key}", {"perplexity": value["perplexity"], "layer_errors": value["layer_errors"]})
    edges = run(
        model_dir,
        texts,
        tokenizer,
        calibs["angelslim"],
        scheme("INT4-GPTQ", params=GPTQParams(dead_columns="zero", damping_retry="add")),
    )
    report(
        "dense/INT4-GPTQ/angelslim+edge-cases",
        {
            "perplexity": edges["perplexity"],
            "fallbacks": edges["fallbacks"],
            "same_layer_errors": edges["layer_errors"] == gptq["angelslim"]["layer_errors"],
        },
    )

    # MoE: routed-only expert statistics against every expert on every token, on the published stream
    model_dir = args.shared / "models" / "tinyqwen3-moe"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = tokenize_calibration(tokenizer, args.data, args.samples, args.moe_seq_len, stream=ANGELSLIM)
    for name in ("FP8-Static", "INT4-GPTQ"):
        base = run(model_dir, texts, tokenizer, calib, scheme(name))
        routed = run(model_dir, texts, tokenizer, calib, scheme(name, calibration=CalibrationParams(experts="routed")))
        entry = {
            "perplexity_all_tokens": base["perplexity"],
            "perplexity_routed": routed["perplexity"],
            "fallbacks_routed": routed["fallbacks"],
        }
        if name == "FP8-Static":
            experts = {k: v for k, v in base["input_scales"].items() if ".experts." in k}
            entry["expert_scale_ratio_routed_to_all"] = ratios(experts, routed["input_scales"])
        report(f"moe/{name}/routed-vs-all-tokens", entry)


if __name__ == "__main__":
    main()

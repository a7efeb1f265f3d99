"""Evaluation throughput of the hf backend (issue 17): lm-eval end to end on a random-init model of a real
architecture, under the simulated-quantization runtime's schemes, against the card's memory roofline.

The model is built as ``bench_quantize.py`` builds it (bf16, weights ~ N(0, 0.02^2), on the GPU); each scheme
replaces every decoder linear by the runtime's :class:`QuantLinear` (round-to-nearest codes: decoding costs
the same whatever algorithm chose them; a fixed static input scale for FP8-Static). The tokenizer is the
fixture's (8192 tokens; ids beyond it decode to nothing), so prompts are real benchmark text in that
tokenizer. Per scheme it measures:

Linears sharing an input (q/k/v, gate/up) share its quantize-dequantize, as :func:`quantbench.checkpoint.load.load_model`
sets them up (:func:`quantbench.checkpoint.load.share_input_quantizations`).

- decode: greedy generation of ``--decode-tokens`` tokens for ``--batch-sizes`` prompts of ``--prompt-len``
  random tokens, through :class:`GreedyDecoder` and (``--baseline``) transformers' ``generate``; decode rate =
  new tokens / (time for N tokens - time for 1), the best of two after a warm-up, against the roofline
  ``batch x bandwidth / bytes per step`` (every weight the step reads in bf16 plus the KV cache at the mean
  context; bandwidth: a device-to-device copy, read + write);
- lm-eval end to end (``simple_evaluate`` through quantbench's harness on the local task twins over
  ``--data-dir``): a loglikelihood task (MMLU, ``--mmlu-limit`` items per subject) and a generation task
  (GSM8K, ``--gsm8k-limit`` items, 5-shot, up to 256 new tokens); the hf backend's HFLM, and with
  ``--baseline`` lm-eval's own HFLM (``generate``) for GSM8K; wall seconds, tokens scored or generated, rates.

From the measured rates (the schemes' median MMLU prompt rate, BF16's decode rate at ``--eval-batch-size``)
it projects the GPU hours of every evaluate job of the seed matrix (``config/seed.yaml``) per decode path
with :func:`quantbench.run.sizing.eval_seconds`, the job-sizing model, from the benchmarks' ``workloads:``.
Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quantize  # noqa: E402  (a script beside this one, not a package)

REPO = bench_quantize.REPO
GIB = 2**30


# --- ceilings ---------------------------------------------------------------------------------------


def ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate, medians of 10 after warm-up."""
    if device.type != "cuda":
        return {}
    src = torch.randn(2 * GIB // 4, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

    def median_ms(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    copy_ms = median_ms(lambda: dst.copy_(src))
    mm_ms = median_ms(lambda: a @ b)
    return {"copy_bytes_per_s": 2 * src.numel() * 4 / (copy_ms / 1e3), "bf16_flops_per_s": 2 * 8192**3 / (mm_ms / 1e3)}


# --- models -----------------------------------------------------------------------------------------


def simulate(model: nn.Module, scheme_name: str) -> list[tuple[str, nn.Module]]:
    """Swap every decoder linear for the runtime's QuantLinear under ``scheme_name``; the originals, to put back."""
    from quantbench.checkpoint.load import share_input_quantizations
    from quantbench.model.architectures import replace_module
    from quantbench.quant.rtn import rtn_quantize_linear
    from quantbench.quant.schemes import load_schemes

    scheme = load_schemes(REPO / "config" / "schemes.yaml")[scheme_name]
    if scheme.weights is None:
        return []
    static = scheme.input_activations is not None and not scheme.input_activations.dynamic
    originals = []
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name != "lm_head":
                scale = torch.full((1,), 0.02, device=module.weight.device) if static else None
                quantized = rtn_quantize_linear(module, scheme, input_scale=scale)
                quantized.dequantized_weight(module.weight.dtype)  # the runtime caches it on first use
                replace_module(model, name, quantized)
                originals.append((name, module))
    share_input_quantizations(model)
    return originals


def restore(model: nn.Module, originals: list[tuple[str, nn.Module]]) -> None:
    from quantbench.model.architectures import replace_module

    for name, module in originals:
        replace_module(model, name, module)
    gc.collect()
    torch.cuda.empty_cache()


def step_bytes(model: nn.Module, batch: int, context: float) -> float:
    """Bytes one decode step must read: every linear weight in bf16 (the runtime computes with dequantized
    bf16 weights) and the KV cache of ``batch`` rows at ``context`` tokens."""
    config = model.config.get_text_config()
    linear = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features"))
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    return 2 * linear + batch * context * kv_per_token


# --- decode -----------------------------------------------------------------------------------------


def decode_rates(model: nn.Module, args: argparse.Namespace, bandwidth: float | None, baseline: bool) -> list[dict]:
    """Greedy decode tokens/s per batch size, through GreedyDecoder and (``baseline``) ``generate``."""
    from quantbench.evaluate.generation import GreedyDecoder, merged_generation_config

    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    decoder = GreedyDecoder(model)
    rows = []
    for batch in args.batch_sizes:
        ids = torch.randint(vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
        mask = torch.ones_like(ids)
        config = merged_generation_config(model, do_sample=False, pad_token_id=0, eos_token_id=None)

        def run_decoder(new: int) -> torch.Tensor:
            return decoder.generate(ids, mask, max_length=args.prompt_len + new, generation_config=config)

        def run_generate(new: int) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(
                    ids, attention_mask=mask, max_length=args.prompt_len + new, generation_config=config
                )

        paths = {"GreedyDecoder (static cache, CUDA graphs)": run_decoder}
        if baseline and batch == args.eval_batch_size:
            paths["transformers generate (dynamic cache)"] = run_generate
        outputs = {}
        for path, run in paths.items():
            seconds = {}
            for new in (1, args.decode_tokens):
                run(new)  # warm-up (and capture)
                bench_quantize.sync(device)
                best = float("inf")
                for _ in range(2):
                    start = time.perf_counter()
                    out = run(new)
                    bench_quantize.sync(device)
                    best = min(best, time.perf_counter() - start)
                seconds[new] = best
                outputs[path] = out
            tokens = batch * (args.decode_tokens - 1)
            rate = tokens / (seconds[args.decode_tokens] - seconds[1])
            row = {"path": path, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.decode_tokens,
                   "prefill_s": seconds[1], "decode_tokens_per_s": rate}  # fmt: skip
            if bandwidth:
                roofline = batch * bandwidth / step_bytes(model, batch, args.prompt_len + args.decode_tokens / 2)
                row |= {"roofline_tokens_per_s": roofline, "of_roofline": rate / roofline}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if len(outputs) == 2:
            a, b = outputs.values()
            rows[-1]["tokens_equal_to_decoder"] = float((a == b).float().mean())
    return rows


# --- lm-eval ----------------------------------------------------------------------------------------


class Counted:
    """Counts what an lm-eval HFLM computes: prompt tokens through full-logit forwards, generated tokens."""

    def __init__(self, lm: Any) -> None:
        self.forward_tokens = 0
        self.generated_tokens = 0
        self.generate_calls = 0
        call, generate = lm._model_call, lm._model_generate

        def counted_call(inps: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            self.forward_tokens += inps.numel()
            return call(inps, *a, **k)

        def counted_generate(context: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            out = generate(context, *a, **k)
            self.generated_tokens += (out.shape[1] - context.shape[1]) * out.shape[0]
            self.generate_calls += 1
            return out

        lm._model_call, lm._model_generate = counted_call, counted_generate


def lm_eval_runs(model: nn.Module, tokenizer: Any, args: argparse.Namespace, baseline: bool) -> list[dict]:
    """MMLU (loglikelihood) and GSM8K (generation) end to end through quantbench's harness."""
    from lm_eval.models.huggingface import HFLM

    from quantbench.evaluate.benchmarks import load_benchmarks
    from quantbench.evaluate.harness import QuantbenchHFLM, run_lm_eval
    from quantbench.evaluate.tasks import build_local_task

    specs = load_benchmarks(REPO / "config" / "benchmarks.yaml")
    runs = [("MMLU", args.mmlu_limit, QuantbenchHFLM), ("GSM8K", args.gsm8k_limit, QuantbenchHFLM)]
    if baseline:
        runs.append(("GSM8K", args.baseline_gsm8k_limit, HFLM))
    rows = []
    for name, limit, cls in runs:
        if not limit:
            continue
        spec = specs[name]
        root = build_local_task(spec, args.data_dir)
        lm = cls(pretrained=model, tokenizer=tokenizer, add_bos_token=True, batch_size=args.eval_batch_size)
        counted = Counted(lm)
        bench_quantize.sync(next(model.parameters()).device)
        start = time.perf_counter()
        outcome = run_lm_eval(lm, spec, root, source="local", limit=limit)
        seconds = time.perf_counter() - start
        row = {
            "benchmark": name, "hflm": cls.__name__, "items": outcome.items, "limit": limit, "seconds": seconds,
            "score": outcome.score, "forward_tokens": counted.forward_tokens, "generated_tokens": counted.generated_tokens,
            "generate_batches": counted.generate_calls, "batch_size": args.eval_batch_size,
        }  # fmt: skip
        if counted.generated_tokens:
            row["generated_tokens_per_s"] = counted.generated_tokens / seconds
        else:
            row["forward_tokens_per_s"] = counted.forward_tokens / seconds
        rows.append(row)
        print(json.dumps(row), flush=True)
        del lm
        gc.collect()
    return rows


# --- the seed matrix --------------------------------------------------------------------------------


def seed_projection(rates: dict[str, Any], generate_rates: dict[str, Any]) -> dict[str, Any]:
    """Wall time of every evaluate job of config/seed.yaml (hf backend, one GPU per job): lm-eval benchmarks at
    ``rates``, the vision-language ones (their scorers call ``generate``) at ``generate_rates``."""
    import yaml

    from quantbench.evaluate.benchmarks import load_benchmarks
    from quantbench.run.sizing import EvalRates, eval_seconds, load_workloads

    seed = yaml.safe_load((REPO / "config" / "seed.yaml").read_text(encoding="utf-8"))
    workloads = load_workloads(REPO / "config" / "benchmarks.yaml")
    specs = load_benchmarks(REPO / "config" / "benchmarks.yaml")
    total = 0.0
    per_model: dict[str, float] = {}
    rows = 0
    missing: set[str] = set()
    for model_name, model in seed["models"].items():
        benchmarks = _benchmarks_of(seed, model_name)
        for _scheme in model["schemes"]:
            rows += 1
            for benchmark in benchmarks:
                workload = workloads.get(benchmark)
                if workload is None:
                    missing.add(benchmark)
                    continue
                measured = EvalRates(**(generate_rates if specs[benchmark].lmms_eval else rates))
                seconds = eval_seconds(model["params_b"], workload, measured)
                per_model[model_name] = per_model.get(model_name, 0.0) + seconds
                total += seconds
    return {"rows": rows, "total_gpu_hours": total / 3600, "per_model_gpu_hours": {k: v / 3600 for k, v in per_model.items()},
            "benchmarks_without_workload": sorted(missing)}  # fmt: skip


def _benchmarks_of(seed: dict, model_name: str) -> list[str]:
    for table in seed.get("tables", []):
        if model_name in (table.get("models") or []):
            return list(table.get("benchmarks") or [])
    return []


# --- report -----------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# Evaluation throughput, {report['setup']['config']} ({report['setup']['layers']} layers), hf backend",
        "",
        f"Device: {env.get('gpu', 'cpu')}; torch {env['torch']}, transformers {env['transformers']}, "
        f"lm-eval {report['setup'].get('lm_eval')}. Copy bandwidth {report['ceilings'].get('copy_bytes_per_s', 0) / 1e12:.2f} TB/s, "
        f"bf16 matmul {report['ceilings'].get('bf16_flops_per_s', 0) / 1e12:.0f} TFLOP/s.",
        "",
        "## Greedy decode",
        "",
        "| scheme | path | batch | decode tokens/s | roofline tokens/s | of roofline | vs BF16 (same path, batch) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {
        (r["path"], r["batch"]): r["decode_tokens_per_s"] for r in report["schemes"].get("BF16", {}).get("decode", [])
    }
    for scheme, result in report["schemes"].items():
        for r in result.get("decode", []):
            ref = base.get((r["path"], r["batch"]))
            vs = f"{r['decode_tokens_per_s'] / ref:.2f}" if ref else "-"
            lines.append(
                f"| {scheme} | {r['path']} | {r['batch']} | {r['decode_tokens_per_s']:.0f} | {r.get('roofline_tokens_per_s', 0):.0f} "
                f"| {r.get('of_roofline', 0):.2f} | {vs} |"
            )
    lines += ["", "## lm-eval end to end", "",
              "| scheme | benchmark | HFLM | items | seconds | tokens | tokens/s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for scheme, result in report["schemes"].items():
        for r in result.get("lm_eval", []):
            tokens = r["generated_tokens"] or r["forward_tokens"]
            rate = r.get("generated_tokens_per_s") or r.get("forward_tokens_per_s")
            kind = "generated" if r["generated_tokens"] else "scored"
            lines.append(
                f"| {scheme} | {r['benchmark']} | {r['hflm']} | {r['items']} | {r['seconds']:.1f} | {tokens} {kind} | {rate:.0f} |"
            )
    if report.get("projection"):
        lines += ["", "## Seed matrix (config/seed.yaml), projected GPU hours per backend", ""]
        for label, p in report["projection"].items():
            lines.append(f"- {label}: {p['rows']} rows, **{p['total_gpu_hours']:.1f} GPU hours** "
                         f"(benchmarks without a workload: {', '.join(p['benchmarks_without_workload']) or 'none'})")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "benchmarks" / "configs" / "qwen3-8b.json")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--schemes", default="BF16,FP8-Static,FP8-Dynamic,INT8-Dynamic,INT4-GPTQ")
    parser.add_argument(
        "--baseline-schemes", default="BF16,FP8-Dynamic", help="schemes also run through generate / HFLM"
    )
    parser.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--data-dir", type=Path, default=REPO / "resources" / "data")
    parser.add_argument("--mmlu-limit", type=int, default=2, help="MMLU items per subject (0: skip)")
    parser.add_argument("--gsm8k-limit", type=int, default=32, help="GSM8K items (0: skip)")
    parser.add_argument("--baseline-gsm8k-limit", type=int, default=16, help="GSM8K items through lm-eval's HFLM")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from importlib import metadata

    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = bench_quantize.load_config(args.config, args.layers)
    model = bench_quantize.build_model(config, 0).to(device)
    tokenizer = AutoTokenizer.from_pretrained(bench_quantize.TOKENIZER_DIR)
    report: dict[str, Any] = {
        "setup": {"config": args.config.stem, "layers": config.num_hidden_layers, "command": " ".join(sys.argv),
                  "lm_eval": metadata.version("lm_eval")},
        "environment": bench_quantize.environment(device),
        "ceilings": ceilings(device),
        "schemes": {},
    }  # fmt: skip
    bandwidth = report["ceilings"].get("copy_bytes_per_s")
    baselines = set(args.baseline_schemes.split(","))

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        (args.out / "results.md").write_text(markdown(report), encoding="utf-8")

    for name in args.schemes.split(","):
        originals = simulate(model, name)
        result: dict[str, Any] = {}
        report["schemes"][name] = result
        try:
            result["decode"] = decode_rates(model, args, bandwidth, baseline=name in baselines)
            result["lm_eval"] = lm_eval_runs(model, tokenizer, args, baseline=name in baselines)
        except Exception as exc:  # noqa: BLE001 - recorded; the other schemes go on
            import traceback

            traceback.print_exc()
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            restore(model, originals)
        save()
    # the simulated schemes all compute with bf16 weights: the prompt rate is their median (the first scheme in
    # the process pays the warm-up), the decode rates are BF16's at the harness's batch size
    scored = sorted(r["forward_tokens_per_s"] for result in report["schemes"].values() for r in result.get("lm_eval", [])
                    if r["benchmark"] == "MMLU")  # fmt: skip
    bf16 = report["schemes"].get("BF16", {})
    paths = {}
    for path in ("GreedyDecoder (static cache, CUDA graphs)", "transformers generate (dynamic cache)"):
        decode = next(
            (r for r in bf16.get("decode", []) if r["path"] == path and r["batch"] == args.eval_batch_size), None
        )
        if scored and decode:
            paths[path] = {"params_b": bench_quantize.parameter_count(model) / 1e9, "prompt_tokens_per_s": scored[len(scored) // 2],
                           "decode_steps_per_s": decode["decode_tokens_per_s"] / decode["batch"], "batch": decode["batch"]}  # fmt: skip
    generate = paths.get("transformers generate (dynamic cache)")
    for path, rates in paths.items():
        report.setdefault("projection", {})[f"hf backend, lm-eval through {path}"] = seed_projection(
            rates, generate or rates
        ) | {"rates": rates}
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()

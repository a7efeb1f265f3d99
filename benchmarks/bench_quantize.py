"""Time quantbench's quantizers on a random-init model of a real architecture (issue 8), and llm-compressor's GPTQ.

The model is built from a config in ``benchmarks/configs`` (bf16, in host memory, weights ~ N(0, 0.02^2),
norms 1), the calibration set is random tokens. For each scheme it measures, end to end:

- calibration schemes (INT4-GPTQ, INT4-AWQ, FP8-Static), in memory like llm-compressor's ``oneshot``:
  ``quantize_model`` with a ``CheckpointExport`` that writes the weight files as the blocks are finished;
  wall seconds split into capture + transfers, block forwards + statistics + error metering, the solver
  (GPTQ solve / AWQ search and rounding / scales), and export (what remains of it after the quantization);
- data-free schemes (FP8-Dynamic, INT8-Dynamic), checkpoint to checkpoint (``quantize_checkpoint`` on
  the bf16 checkpoint written first), against the time to read the input checkpoint's tensors and
  write the output's with plain safetensors calls;
- peak GPU memory (``torch.cuda.max_memory_allocated``), peak host RSS (sampled), the engine's per-layer
  relative output errors, and optionally the simulated-quantization runtime's tokens/s against BF16.

With ``--llmcompressor`` it also runs llm-compressor's ``GPTQModifier(scheme="W4A16")`` on the same model
and samples in a subprocess (``--llmcompressor-site``: a folder holding llm-compressor and its
compressed-tensors, put first on that subprocess's PYTHONPATH) and compares per-layer errors of both with
one evaluator (:func:`block_errors`: each block with fake-quantized weights vs the original block on the
same propagated inputs, over ``--compare-samples`` samples). ``--llmcompressor-results`` reuses the
llm-compressor numbers of an earlier run instead (a run on fewer layers of the same config and seed has the
same first layers on the same inputs, so their errors compare layer for layer).

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "resources" / "models" / "tinyqwen3-dense"  # any tokenizer: saved beside the weights only
CALIBRATION_SCHEMES = ("INT4-GPTQ", "INT4-AWQ", "FP8-Static")
DATA_FREE_SCHEMES = ("FP8-Dynamic", "INT8-Dynamic")
GIB = 2**30


# --- model and data ---------------------------------------------------------------------------------


def load_config(path: Path, layers: int | None) -> Any:
    """The transformers config in ``path`` (a Hub-style config.json), optionally cut to ``layers`` layers."""
    from transformers import AutoConfig

    raw = json.loads(path.read_text(encoding="utf-8"))
    if layers is not None:
        raw["num_hidden_layers"] = layers
        raw["max_window_layers"] = min(raw.get("max_window_layers", layers), layers)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build_model(config: Any, seed: int) -> nn.Module:
    """bf16 random-init model in host memory: matrices ~ N(0, initializer_range^2), vectors (norms) 1.

    Values are drawn on the GPU when there is one (fast for 8B parameters) with a fixed seed, so the
    llm-compressor subprocess builds the same weights.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    draw_on = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(draw_on).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if param.dim() == 1:
                value = torch.ones(param.shape, dtype=torch.bfloat16)
            else:
                value = (torch.randn(param.shape, generator=generator, device=draw_on) * std).to(torch.bfloat16).cpu()
            module._parameters[key] = nn.Parameter(value, requires_grad=False)
    model.tie_weights()
    return model.eval()


def random_calibration(vocab_size: int, samples: int, seq_len: int, seed: int) -> Any:
    """``samples`` x ``seq_len`` uniformly random token ids, no padding."""
    from quantbench.calibration.samples import Calibration

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (samples, seq_len), generator=generator)
    return Calibration(ids, torch.ones_like(ids), {"source": "random tokens", "seed": seed})


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- measuring --------------------------------------------------------------------------------------


class PeakRSS:
    """Samples this process's resident set size every 20 ms while active; ``peak`` in bytes."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def gpu_peak(device: torch.device, into: dict[str, Any]) -> Iterator[None]:
    """Record peak allocated/reserved GPU memory (GiB) of the enclosed code into ``into``."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        into["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        into["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB


def engine_breakdown(stats: Any) -> dict[str, float]:
    """Split the engine's own timings: solver, block passes (forwards, statistics, error metering), the rest."""
    solver = sum(g.seconds for layer in stats.layers for g in layer.groups)
    blocks = sum(layer.seconds for layer in stats.layers)
    return {
        "quantize_s": stats.seconds,
        "solver_s": solver,
        "block_passes_s": blocks - solver,
        "capture_and_transfers_s": stats.seconds - blocks,
    }


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# --- per-layer error, one evaluator for every tool ---------------------------------------------------


def block_errors(
    pristine: nn.Module, weights: dict[str, torch.Tensor], calibration: Any, device: torch.device
) -> list[float]:
    """Per block, ``sum |y_q - y|^2 / sum |y|^2`` over the calibration tokens.

    ``y_q``: the block with ``weights`` (fake-quantized linear weights by module name) on the inputs the
    quantized model before it produced; ``y``: the original block on the same inputs (the engine's
    per-layer error, measured the same way for any tool).
    """
    from quantbench.model.architectures import block_list, get_architecture
    from quantbench.quant.capture import ModuleCall, replay
    from quantbench.quant.sequential import PipelineOptions, capture_block_inputs

    stack = get_architecture(pristine.config).language
    blocks = block_list(pristine, stack)
    errors = []
    with torch.no_grad():
        calls = capture_block_inputs(pristine, blocks, calibration, device, PipelineOptions())
        for index, block in enumerate(blocks):
            prefix = f"{stack.path}.{index}."
            reference = copy.deepcopy(block).to(device)
            quantized = copy.deepcopy(block).to(device)
            for name, module in quantized.named_modules():
                if isinstance(module, nn.Linear):
                    module.weight.data = weights[prefix + name].to(device, module.weight.dtype)
            err = ref = 0.0
            for k, call in enumerate(calls):
                y = replay(reference, call, device).float()
                y_q = replay(quantized, call, device)
                mask = call.mask.to(device)[..., None]
                err += float(((y_q.float() - y) ** 2 * mask).sum())
                ref += float((y**2 * mask).sum())
                calls[k] = ModuleCall((y_q,), call.kwargs, call.mask)
            errors.append(err / max(ref, 1e-30))
            del reference, quantized
    return errors


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the bf16 weight each QuantLinear computes with."""
    from quantbench.quant.linear import QuantLinear

    return {
        n: m.dequantized_weight(torch.bfloat16).cpu() for n, m in model.named_modules() if isinstance(m, QuantLinear)
    }


# --- throughput -------------------------------------------------------------------------------------


def throughput(
    model: nn.Module, device: torch.device, batch: int, seq_len: int, decode_tokens: int
) -> dict[str, float]:
    """tokens/s of a full-logits forward (``batch`` x ``seq_len``, as lm-eval scores loglikelihoods) and of
    greedy decoding ``decode_tokens`` tokens for ``batch`` prompts of 128 tokens (KV cache); each the best
    of two timed runs after a full warm-up run."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (batch, seq_len), generator=generator).to(device)
    prompt = ids[:, :128]
    generate = {"max_new_tokens": decode_tokens, "min_new_tokens": decode_tokens, "do_sample": False, "pad_token_id": 0}

    def best_of_two(run: Any) -> float:
        run()
        sync(device)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        return {
            "forward_tokens_per_s": ids.numel() / best_of_two(lambda: model(input_ids=ids, use_cache=False)),
            "decode_tokens_per_s": batch * decode_tokens / best_of_two(lambda: model.generate(prompt, **generate)),
        }


def measure_throughput(
    model: nn.Module, device: torch.device, args: argparse.Namespace, *, keep: bool
) -> dict[str, float]:
    """:func:`throughput` of ``model`` moved to ``device``; moved back to the CPU after if ``keep``, else left
    for the caller to drop (saves copying 16 GB back)."""
    model.to(device)
    try:
        return throughput(model, device, args.tp_batch, args.tp_seq_len, args.tp_decode)
    finally:
        if keep:
            model.to("cpu")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- quantbench -------------------------------------------------------------------------------------


def bench_in_memory(
    pristine: nn.Module, name: str, calibration: Any, device: torch.device, args: argparse.Namespace
) -> tuple[dict, nn.Module]:
    """Quantize a copy of ``pristine`` under scheme ``name`` and export it; timings, memory, errors."""
    from transformers import AutoTokenizer

    from quantbench.checkpoint.export import CheckpointExport
    from quantbench.quant.quantize import quantize_model
    from quantbench.quant.schemes import load_schemes
    from quantbench.quant.sequential import PipelineOptions

    scheme = load_schemes(REPO / "config" / "schemes.yaml")[name]
    options = PipelineOptions(chunk_size=args.chunk_size, offload_activations=args.offload_activations)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = copy.deepcopy(pristine)
    out_dir = args.work / name
    result: dict[str, Any] = {"scheme": name, "mode": "in memory (quantize_model exporting meanwhile)"}
    with PeakRSS() as rss, gpu_peak(device, result):
        start = time.perf_counter()
        with CheckpointExport(model, out_dir) as export:
            stats = quantize_model(model, scheme, calibration, device=device, options=options, export=export)
            sync(device)
            quantized = time.perf_counter()
            export.finish(tokenizer, scheme, provenance={"model": "random init", "seed": args.seed})
        done = time.perf_counter()
    result.update(engine_breakdown(stats))
    result.update(
        total_s=done - start,
        export_s=done - quantized,
        peak_rss_gib=rss.peak / GIB,
        checkpoint_gib=dir_bytes(out_dir) / GIB,
        layer_errors=[layer.rel_error for layer in stats.layers],
        layer_seconds=[layer.seconds for layer in stats.layers],  # block 0's includes the warm-up
        layer_solver_seconds=[sum(g.seconds for g in layer.groups) for layer in stats.layers],
        fallbacks=stats.fallbacks,
    )
    shutil.rmtree(out_dir)
    return result, model


def io_floor(input_dir: Path, output_dir: Path, scratch: Path) -> dict[str, float]:
    """Seconds to read every file of ``input_dir`` and to write as many bytes as ``output_dir`` holds
    (the same bytes, into ``scratch``): what any checkpoint-to-checkpoint tool must at least do."""
    start = time.perf_counter()
    for file in sorted(input_dir.iterdir()):
        if file.is_file():
            file.read_bytes()
    read = time.perf_counter() - start
    payload = [(file.name, file.read_bytes()) for file in sorted(output_dir.iterdir()) if file.is_file()]
    scratch.mkdir()
    start = time.perf_counter()
    for name, data in payload:
        (scratch / name).write_bytes(data)
    write = time.perf_counter() - start
    shutil.rmtree(scratch)
    return {"read_input_s": read, "write_output_s": write, "io_floor_s": read + write}


def bench_checkpoint(bf16_dir: Path, name: str, device: torch.device, args: argparse.Namespace) -> dict:
    """``quantize_checkpoint`` from the bf16 checkpoint, against reading the input and writing the output."""
    from quantbench.quant.quantize import quantize_checkpoint
    from quantbench.quant.schemes import load_schemes

    scheme = load_schemes(REPO / "config" / "schemes.yaml")[name]
    out_dir = args.work / name
    result: dict[str, Any] = {"scheme": name, "mode": "checkpoint to checkpoint (quantize_checkpoint)"}
    with PeakRSS() as rss, gpu_peak(device, result):
        start = time.perf_counter()
        quantize_checkpoint(bf16_dir, scheme, out_dir, device=device, seed=args.seed)
        result["total_s"] = time.perf_counter() - start
    result["peak_rss_gib"] = rss.peak / GIB
    result["checkpoint_gib"] = dir_bytes(out_dir) / GIB
    result.update(io_floor(bf16_dir, out_dir, args.work / f"{name}-copy"))
    result["vs_io_floor"] = result["total_s"] / result["io_floor_s"]
    if args.throughput:
        from quantbench.checkpoint.load import load_model

        model, _ = load_model(out_dir, device=str(device))
        result["throughput"] = measure_throughput(model, device, args, keep=False)
        del model
    shutil.rmtree(out_dir)
    return result


# --- llm-compressor ---------------------------------------------------------------------------------


def run_llmcompressor(args: argparse.Namespace) -> dict:
    """llm-compressor GPTQ W4A16 (its defaults, lm_head ignored) on the same model and samples; this process."""
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_config(args.config, args.layers)
    pristine = build_model(config, args.seed)
    model = copy.deepcopy(pristine)
    config_dir = args.work / "llmcompressor-config"  # oneshot re-reads the config from name_or_path
    model.config.save_pretrained(config_dir)
    model.config.name_or_path = str(config_dir)
    calibration = random_calibration(config.vocab_size, args.samples, args.seq_len, args.seed)
    rows = [
        {"input_ids": ids[None], "attention_mask": mask[None]}
        for ids, mask in zip(calibration.input_ids, calibration.attention_mask)
    ]
    loader = torch.utils.data.DataLoader(rows, batch_size=None)
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    result: dict[str, Any] = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "layers": config.num_hidden_layers,
    }
    out_dir = args.work / "llmcompressor-W4A16"
    with PeakRSS() as rss, gpu_peak(device, result):
        start = time.perf_counter()
        oneshot(model=model, tokenizer=tokenizer, dataset=loader, recipe=recipe, num_calibration_samples=args.samples,
                max_seq_length=args.seq_len, shuffle_calibration_samples=False)  # fmt: skip
        sync(device)
        result["oneshot_s"] = time.perf_counter() - start
        # saving compresses the modules in place: take the fake-quantized weights first (not timed)
        weights = {
            n: m.weight.detach().to("cpu", copy=True)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head"
        }
        result["on_grid"] = on_grid_fraction(model)
        start = time.perf_counter()
        model.save_pretrained(out_dir, save_compressed=True)
        result["export_s"] = time.perf_counter() - start
    result.update(
        total_s=result["oneshot_s"] + result["export_s"],
        peak_rss_gib=rss.peak / GIB,
        checkpoint_gib=dir_bytes(out_dir) / GIB,
    )
    shutil.rmtree(out_dir)
    del model
    if args.compare_samples:
        subset = random_calibration(config.vocab_size, args.compare_samples, args.seq_len, args.seed)
        result["compare_layer_errors"] = block_errors(pristine, weights, subset, device)
    return result


def on_grid_fraction(model: nn.Module) -> float:
    """Of llm-compressor's first quantized linear: the share of weights that are scale * integer (sanity check
    that ``module.weight`` holds the fake-quantized weight the evaluator needs)."""
    for module in model.modules():
        scale = getattr(module, "weight_scale", None)
        if isinstance(module, nn.Linear) and scale is not None:
            w = module.weight.detach().float().cpu()
            s = scale.detach().float().cpu().repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
            ratio = w / s
            return float(
                ((ratio - ratio.round()).abs() < 0.05).float().mean()
            )  # bf16 storage blurs q * s by < 0.03 steps
    return float("nan")


def datasets_stand_in(folder: Path) -> Path:
    """A ``datasets`` package of empty names, for a machine without HF datasets (and its 55 MB pyarrow).

    llm-compressor imports ``Dataset``, ``DatasetDict``, ``IterableDataset``, ``load_dataset`` and
    ``LazyRow`` at import time, but a DataLoader passed to ``oneshot`` bypasses all its dataset code.
    """
    root = folder / "datasets-stand-in"
    (root / "datasets" / "formatting").mkdir(parents=True, exist_ok=True)
    (root / "datasets" / "__init__.py").write_text(
        "class Dataset: pass\nclass DatasetDict(dict): pass\nclass IterableDataset: pass\n"
        "def load_dataset(*args, **kwargs):\n    raise RuntimeError('stand-in: HF datasets is not installed')\n",
        encoding="utf-8",
    )
    (root / "datasets" / "formatting" / "__init__.py").write_text("", encoding="utf-8")
    (root / "datasets" / "formatting" / "formatting.py").write_text("class LazyRow(dict): pass\n", encoding="utf-8")
    print(f"llm-compressor: HF datasets missing, using the import stand-in at {root}", flush=True)
    return root


def earlier_llmcompressor(path: Path) -> dict:
    """The llm-compressor numbers of an earlier run's results.json (same config, seed and samples)."""
    earlier = json.loads(path.read_text(encoding="utf-8"))
    llmc = dict(earlier["compare"]["llmcompressor"])
    llmc.setdefault("layers", earlier["setup"]["layers"])
    llmc["from"] = str(path)
    return llmc


def llmcompressor_subprocess(args: argparse.Namespace) -> dict:
    """Run :func:`run_llmcompressor` in a child process whose PYTHONPATH starts with ``--llmcompressor-site``."""
    out = args.work / "llmcompressor.json"
    command = [sys.executable, __file__, "--tool", "llmcompressor", "--config", str(args.config), "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--compare-samples", str(args.compare_samples),
               "--out", str(args.out), "--work", str(args.work), "--result", str(out)]  # fmt: skip
    if args.layers is not None:
        command += ["--layers", str(args.layers)]
    env = dict(os.environ)
    if args.llmcompressor_site:
        env["PYTHONPATH"] = os.pathsep.join([str(args.llmcompressor_site), str(REPO / "src")])
    if subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True, check=False).returncode:
        env["PYTHONPATH"] = os.pathsep.join([env.get("PYTHONPATH", ""), str(datasets_stand_in(args.work))])
    start = time.perf_counter()
    done = subprocess.run(command, env=env, check=False)
    if done.returncode:
        return {"tool": "llm-compressor", "error": f"exit status {done.returncode} (see the log above)"}
    result = json.loads(out.read_text(encoding="utf-8"))
    result["process_s"] = time.perf_counter() - start
    return result


# --- report -----------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    from importlib import metadata

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    for package in ("transformers", "safetensors", "triton", "compressed-tensors", "llmcompressor"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
    return env


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    """The run as Markdown: setup, one row per scheme, per-layer error summary, throughput."""
    setup = report["setup"]
    lines = [
        f"# {setup['config']} ({setup['layers']} layers, {setup['parameters'] / 1e9:.2f}B parameters), "
        f"{setup['samples']} x {setup['seq_len']} calibration tokens",
        "",
        f"Device: {report['environment'].get('gpu', 'cpu')}; torch {report['environment']['torch']}, "
        f"transformers {report['environment']['transformers']}, triton {report['environment']['triton']}.",
        "",
        "| scheme | mode | total s | quantize s | capture+transfers s | block passes s | solver s | export s "
        "| I/O floor s | vs floor | peak GPU GiB | peak RSS GiB | mean layer err | max layer err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["schemes"]:
        if "error" in r:
            lines.append(f"| {r['scheme']} | failed: {r['error'][:200]} |" + " |" * 12)
            continue
        errors = [e for e in r.get("layer_errors", []) if e is not None]
        lines.append(
            "| " + " | ".join([
                r["scheme"], r["mode"].split(" (")[0], fmt(r.get("total_s")), fmt(r.get("quantize_s")),
                fmt(r.get("capture_and_transfers_s")), fmt(r.get("block_passes_s")), fmt(r.get("solver_s")),
                fmt(r.get("export_s")), fmt(r.get("io_floor_s")), fmt(r.get("vs_io_floor"), 2), fmt(r.get("peak_gpu_gib"), 2),
                fmt(r.get("peak_rss_gib")), fmt(sum(errors) / len(errors), 5) if errors else "-",
                fmt(max(errors), 5) if errors else "-",
            ]) + " |"
        )  # fmt: skip
    compare = report.get("compare")
    if compare:
        llmc = compare["llmcompressor"]
        same = (
            f"same weights and samples; llm-compressor's numbers from {llmc['from']}"
            if "from" in llmc
            else "same weights, samples and card"
        )
        lines += ["", f"## INT4 GPTQ against llm-compressor's GPTQ W4A16 ({same})", ""]
        if "error" in llmc:
            lines.append(f"llm-compressor did not run: {llmc['error']}")
        else:
            ours, theirs = compare["quantbench_layer_errors"], llmc["compare_layer_errors"]
            lines.append(
                f"llm-compressor {llmc['version']} on {llmc['layers']} layers: oneshot {fmt(llmc['oneshot_s'])} s + save "
                f"{fmt(llmc['export_s'])} s = {fmt(llmc['total_s'])} s, peak GPU {fmt(llmc.get('peak_gpu_gib'), 2)} GiB."
            )
            if llmc["layers"] == setup["layers"]:
                lines.append(
                    f"quantbench INT4-GPTQ {fmt(compare['quantbench_total_s'])} s: "
                    f"**{llmc['total_s'] / compare['quantbench_total_s']:.1f}x faster**."
                )
            lines += [
                f"Weights on llm-compressor's grid (sanity check of the evaluator's input): {llmc['on_grid']:.4f}.",
                f"Per-layer relative output error over {compare['samples']} calibration samples, one evaluator for both "
                "(the first layers of a deeper model are the same weights on the same inputs):",
                "",
                "| layer | quantbench | llm-compressor | ratio |",
                "|---|---|---|---|",
            ]
            for i, (a, b) in enumerate(zip(ours, theirs)):
                lines.append(f"| {i} | {a:.5f} | {b:.5f} | {a / b:.3f} |")
    rates = {"BF16": report.get("bf16_throughput")} | {r["scheme"]: r.get("throughput") for r in report["schemes"]}
    if rates["BF16"]:
        base = rates["BF16"]
        lines += [
            "",
            "## Simulated-quantization runtime throughput (QuantLinear vs the BF16 model, same harness)",
            "",
            "| model | forward tokens/s | vs BF16 | decode tokens/s | vs BF16 |",
            "|---|---|---|---|---|",
        ]
        for name, t in rates.items():
            if t:
                lines.append(
                    f"| {name} | {t['forward_tokens_per_s']:.0f} | {t['forward_tokens_per_s'] / base['forward_tokens_per_s']:.2f} "
                    f"| {t['decode_tokens_per_s']:.1f} | {t['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="Hub-style config.json of the architecture")
    parser.add_argument("--layers", type=int, help="keep only this many decoder layers")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--schemes", default=",".join(CALIBRATION_SCHEMES + DATA_FREE_SCHEMES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--offload-activations", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--work", type=Path, help="scratch folder for checkpoints (default: OUT/work)")
    parser.add_argument("--llmcompressor", action="store_true", help="also run llm-compressor's GPTQ W4A16")
    parser.add_argument("--llmcompressor-site", type=Path, help="folder with llm-compressor, first on its PYTHONPATH")
    parser.add_argument(
        "--llmcompressor-results",
        type=Path,
        help="results.json of an earlier run with --llmcompressor, to compare with",
    )
    parser.add_argument(
        "--compare-samples", type=int, default=16, help="samples for the common per-layer error (0: skip)"
    )
    parser.add_argument("--throughput", action="store_true", help="tokens/s of each quantized model vs BF16")
    parser.add_argument("--tp-batch", type=int, default=8)
    parser.add_argument("--tp-seq-len", type=int, default=1024)
    parser.add_argument("--tp-decode", type=int, default=64)
    parser.add_argument("--tool", choices=("quantbench", "llmcompressor"), default="quantbench", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or args.out / "work"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tool == "llmcompressor":
        args.result.write_text(json.dumps(run_llmcompressor(args), indent=1), encoding="utf-8")
        return

    from quantbench.quant.quantize import resolve_device

    device = resolve_device(args.device)
    names = [n for n in args.schemes.split(",") if n]
    started = time.perf_counter()
    config = load_config(args.config, args.layers)
    pristine = build_model(config, args.seed)
    calibration = random_calibration(config.vocab_size, args.samples, args.seq_len, args.seed)
    report: dict[str, Any] = {
        "setup": {
            "config": args.config.stem, "layers": config.num_hidden_layers, "parameters": parameter_count(pristine),
            "samples": args.samples, "seq_len": args.seq_len, "chunk_size": args.chunk_size,
            "offload_activations": args.offload_activations, "seed": args.seed, "build_s": time.perf_counter() - started,
            "command": " ".join(sys.argv),
        },
        "environment": environment(device),
        "schemes": [],
    }  # fmt: skip
    print(
        f"built {report['setup']['parameters'] / 1e9:.2f}B parameters in {report['setup']['build_s']:.1f} s", flush=True
    )
    if args.throughput:
        report["bf16_throughput"] = measure_throughput(pristine, device, args, keep=True)
    bf16_dir = None
    if any(n in DATA_FREE_SCHEMES for n in names):
        from transformers import AutoTokenizer

        bf16_dir = args.work / "bf16"
        pristine.save_pretrained(bf16_dir)
        AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(bf16_dir)

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        (args.out / "results.md").write_text(markdown(report), encoding="utf-8")

    for name in names:
        try:
            if name in DATA_FREE_SCHEMES:
                result, model = bench_checkpoint(bf16_dir, name, device, args), None
            else:
                result, model = bench_in_memory(pristine, name, calibration, device, args)
        except Exception as exc:  # noqa: BLE001 - recorded; the other schemes go on
            traceback.print_exc()
            report["schemes"].append({"scheme": name, "mode": "failed", "error": f"{type(exc).__name__}: {exc}"})
            save()
            continue
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("layer_")}), flush=True)
        report["schemes"].append(result)
        if name == "INT4-GPTQ" and args.compare_samples and (args.llmcompressor or args.llmcompressor_results):
            subset = random_calibration(config.vocab_size, args.compare_samples, args.seq_len, args.seed)
            report["compare"] = {
                "samples": args.compare_samples,
                "quantbench_total_s": result["total_s"],
                "quantbench_layer_errors": block_errors(pristine, dequantized_weights(model), subset, device),
                "llmcompressor": llmcompressor_subprocess(args)
                if args.llmcompressor
                else earlier_llmcompressor(args.llmcompressor_results),
            }
        if model is not None and args.throughput:
            result["throughput"] = measure_throughput(model, device, args, keep=False)
        del model
        gc.collect()
        save()
    if bf16_dir is not None:
        shutil.rmtree(bf16_dir)
    save()
    print(markdown(report))


if __name__ == "__main__":
    main()

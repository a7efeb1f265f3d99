"""Where the sequential pipeline's time goes: exclusive wall seconds per phase, per scheme, on a cut model.

Builds the model of ``bench_quantize.py`` (random init from an architecture config, ``--layers`` decoder
layers), quantizes it per scheme and exports it, three times:

1. plainly, for the true total (no added synchronisation);
2. with the pipeline's and solver's functions wrapped by timers that synchronise the GPU before and after
   each call and charge each phase its own time only (time spent in wrapped callees goes to those);
   synchronising removes overlap, so these phases add up to more than run 1;
3. under ``torch.profiler`` (unless ``--no-torch-profile``): the operators with the most self CUDA time
   and the most self CPU time.

The wrappers replace module attributes of quantbench for the duration of run 2 only; nothing here is
used by the library. Writes ``profile.json`` and ``profile.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quantize  # noqa: E402  (a script beside this one, not a package)
from quantbench.checkpoint import export  # noqa: E402
from quantbench.quant import awq, gptq, gptq_kernel, norm_kernel, prefetch, qdq, sequential  # noqa: E402


class PhaseTimer:
    """Exclusive wall time per phase of wrapped callables (main thread only; GPU synchronised at each edge)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._children: list[float] = []
        self._restore: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        original = getattr(owner, attr)
        timer = self

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return original(*args, **kwargs)
            bench_quantize.sync(timer.device)
            start = time.perf_counter()
            timer._children.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                bench_quantize.sync(timer.device)
                elapsed = time.perf_counter() - start
                timer.seconds[phase] += elapsed - timer._children.pop()
                timer.calls[phase] += 1
                if timer._children:
                    timer._children[-1] += elapsed

        self._restore.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()


PHASES: list[tuple[Any, str, str]] = [
    (sequential, "capture_block_inputs", "capture block-0 inputs"),
    (prefetch.BlockPrefetcher, "take", "wait for prefetched block"),
    (nn.Module, "to", "module .to() in the main thread (block copy-back)"),
    (sequential, "_quantize_block", "block: rest (hooks setup, masks, python)"),
    (sequential, "replay", "block forward"),
    (sequential.Group, "observe", "input statistics (Hessian / absmax)"),
    (sequential._ErrorMeter, "measure", "error meters: reference linear"),
    (sequential, "_accumulate_error", "error sums"),
    (sequential, "_store", "store activations"),
    (awq.Smoothing, "apply", "AWQ search"),
    (sequential, "_quantize_group", "quantize: rest"),
    (gptq, "_inverse_cholesky", "gptq: Cholesky + inverse"),
    (qdq, "weight_qparams", "weight qparams"),
    (gptq_kernel, "quantize_columns", "gptq: column kernel"),
    (norm_kernel, "rms_norm", "fused RMSNorm"),
    (export, "save_quantized", "export: rest (and file hashes computed in worker threads)"),
    (export, "save_file", "export: safetensors write"),
    (export, "pack_int4", "export: int4 packing"),
    (export, "sha256_file", "export: sha256"),
]


def run_scheme(
    pristine: nn.Module, name: str, calibration: Any, device: torch.device, args: argparse.Namespace
) -> dict:
    """Seconds of quantize + export of a copy of ``pristine`` (the bench's in-memory mode)."""
    bench_args = argparse.Namespace(chunk_size=8, offload_activations=False, work=args.out / "work", seed=0)
    result, model = bench_quantize.bench_in_memory(pristine, name, calibration, device, bench_args)
    del model
    return result


@contextmanager
def torch_profile(into: dict[str, str], key: str, rows: int) -> Iterator[None]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    averages = prof.key_averages()
    into[key] = (
        averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60) + "\n"
        if torch.cuda.is_available()
        else ""
    ) + averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--schemes", default="INT4-GPTQ,FP8-Static")
    parser.add_argument("--no-torch-profile", action="store_true")
    parser.add_argument("--rows", type=int, default=22, help="operators listed per torch.profiler table")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = bench_quantize.load_config(args.config, args.layers)
    pristine = bench_quantize.build_model(config, 0)
    calibration = bench_quantize.random_calibration(config.vocab_size, args.samples, args.seq_len, 0)
    report: dict[str, Any] = {"layers": args.layers, "samples": args.samples, "seq_len": args.seq_len,
                              "environment": bench_quantize.environment(device), "schemes": {}}  # fmt: skip
    tables: dict[str, str] = {}
    for name in args.schemes.split(","):
        plain = run_scheme(pristine, name, calibration, device, args)
        timer = PhaseTimer(device)
        for owner, attr, phase in PHASES:
            timer.wrap(owner, attr, phase)
        try:
            start = time.perf_counter()
            timed = run_scheme(pristine, name, calibration, device, args)
            timed_total = time.perf_counter() - start
        finally:
            timer.restore()
        report["schemes"][name] = {
            "plain": {k: v for k, v in plain.items() if k != "layer_errors"},
            "instrumented_total_s": timed_total,
            "phases_s": dict(sorted(timer.seconds.items(), key=lambda kv: -kv[1])),
            "calls": dict(timer.calls),
            "layer_errors_equal": plain["layer_errors"] == timed["layer_errors"],
        }
        if not args.no_torch_profile:
            with torch_profile(tables, name, args.rows):
                run_scheme(pristine, name, calibration, device, args)
        print(json.dumps(report["schemes"][name], indent=1), flush=True)
    shutil.rmtree(args.out / "work", ignore_errors=True)
    lines = [f"# Pipeline phases, {config.model_type} {args.layers} layers, {args.samples} x {args.seq_len} tokens, "
             f"{report['environment'].get('gpu')}", ""]  # fmt: skip
    for name, r in report["schemes"].items():
        p = r["plain"]
        lines += [
            f"## {name}: plain total {p['total_s']:.2f} s (quantize {p['quantize_s']:.2f}, export {p['export_s']:.2f}; "
            f"engine: capture+transfers {p['capture_and_transfers_s']:.2f}, block passes {p['block_passes_s']:.2f}, "
            f"solver {p['solver_s']:.2f}); instrumented {r['instrumented_total_s']:.2f} s",
            "",
            "| phase (exclusive, synchronised) | s | calls |",
            "|---|---|---|",
        ]
        lines += [f"| {phase} | {s:.3f} | {r['calls'][phase]} |" for phase, s in r["phases_s"].items()]
        lines.append("")
    (args.out / "profile.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    text = "\n".join(lines) + "\n" + "".join(f"\n## torch.profiler: {k}\n\n```\n{v}\n```\n" for k, v in tables.items())
    (args.out / "profile.md").write_text(text, encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

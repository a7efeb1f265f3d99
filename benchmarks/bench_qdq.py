"""Activation quantization on the GPU: the torch path of ``qdq`` against the fused kernel of ``qdq_kernel``
(fp8: quantize-dequantize; int8: the codes and per-token scales the W8A8 product takes).

For each (shape, scheme) it checks that both give the same bits on fresh random inputs (several seeds,
heavy-tailed rows over many magnitudes) and times both with ``triton.testing.do_bench`` (median), reporting
the kernel's effective bandwidth (bytes read once + written once over its time). Prints a Markdown table
and writes it, with the raw numbers, under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from quantbench.quant import qdq, qdq_kernel
from quantbench.quant.schemes import QuantArgs

SCHEMES = {
    "INT8-Dynamic (int8 token)": QuantArgs(type="int", num_bits=8, strategy="token", symmetric=True, dynamic=True),
    "FP8-Dynamic (fp8 token)": QuantArgs(type="float", num_bits=8, strategy="token", symmetric=True, dynamic=True),
    "FP8-Static (fp8 tensor)": QuantArgs(type="float", num_bits=8, strategy="tensor", symmetric=True, dynamic=False),
}


def activations(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.exp(torch.randn(rows, 1, device="cuda", generator=g) * 2)
    return (torch.randn(rows, width, device="cuda", generator=g) * scale).to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8192x4096,8192x12288,8x4096", help="rows x width, comma separated")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_out = []
    for shape in args.shapes.split(","):
        rows, width = (int(v) for v in shape.split("x"))
        for name, qargs in SCHEMES.items():
            mismatched = 0
            for seed in range(args.seeds):
                x = activations(rows, width, seed)
                scale = None if qargs.dynamic else qdq.static_input_scale(x.float().abs().amax() * 0.7, qargs)
                if qargs.type == "float":
                    ref = qdq.quantize_dequantize_activation(x, qargs, scale)
                    got = qdq_kernel.fake_quantize_activation(x, qargs, scale)
                    mismatched += int((ref.view(torch.int16) != got.view(torch.int16)).sum())
                else:
                    (ref, ref_scales), (got, got_scales) = (
                        qdq.int_activation_codes(x, qargs),
                        qdq_kernel.int_activation_codes(x, qargs),
                    )
                    mismatched += int((ref != got.float()).sum()) + int(
                        (ref_scales.view(torch.int32) != got_scales.view(torch.int32)).sum()
                    )
            torch_fn, kernel_fn = (
                (qdq.quantize_dequantize_activation, qdq_kernel.fake_quantize_activation)
                if qargs.type == "float"
                else (qdq.int_activation_codes, qdq_kernel.int_activation_codes)
            )
            torch_ms = triton.testing.do_bench(lambda: torch_fn(x, qargs, scale), return_mode="median")
            kernel_ms = triton.testing.do_bench(lambda: kernel_fn(x, qargs, scale), return_mode="median")
            written = x.element_size() if qargs.type == "float" else 1
            gbps = x.numel() * (x.element_size() + written) / (kernel_ms * 1e-3) / 1e9
            rows_out.append({"shape": shape, "scheme": name, "torch_ms": torch_ms, "kernel_ms": kernel_ms,
                             "speedup": torch_ms / kernel_ms, "kernel_GBps": gbps, "mismatched_values": mismatched,
                             "values_checked": args.seeds * x.numel()})  # fmt: skip
    lines = [
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; bf16 inputs.",
        "",
        "| shape | scheme | torch ms | fused ms | speedup | fused GB/s | values differing / checked |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['shape']} | {r['scheme']} | {r['torch_ms']:.4f} | {r['kernel_ms']:.4f} | {r['speedup']:.1f}x "
            f"| {r['kernel_GBps']:.0f} | {r['mismatched_values']} / {r['values_checked']} |"
        )
    (args.out / "qdq.json").write_text(json.dumps(rows_out, indent=1), encoding="utf-8")
    (args.out / "qdq.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Hessian accumulation ``H += x^T x`` (bf16 rows, float32 sums) on the GPU: the whole product against its
upper block tiles only (``H`` is symmetric), for the widths of a decoder layer's inputs.

For each width and tile count it times one chunk's update (median of ``triton.testing.do_bench``) and compares
every upper-tile value with the whole product's, bit for bit, and the whole product's lower triangle with its
upper one (is it exactly symmetric?). CUDA only. Writes ``hessian.json`` and ``hessian.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton.testing


def upper_tiles(hessian: torch.Tensor, rows: torch.Tensor, tiles: int) -> None:
    """``hessian``'s upper block tiles (diagonal ones whole) += those of ``rows^T rows``."""
    bounds = torch.linspace(0, rows.shape[1], tiles + 1).round().long().tolist()
    for i in range(tiles):
        a = slice(bounds[i], bounds[i + 1])
        for j in range(i, tiles):
            b = slice(bounds[j], bounds[j + 1])
            hessian[a, b] += torch.mm(rows[:, a].t(), rows[:, b], out_dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384, help="tokens per chunk")
    parser.add_argument("--widths", default="4096,12288")
    parser.add_argument("--tiles", default="1,2,3,4,6")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for width in (int(w) for w in args.widths.split(",")):
        scales = torch.exp(torch.randn(width, device="cuda", generator=g))
        rows = (torch.randn(args.rows, width, device="cuda", generator=g) * scales).to(torch.bfloat16)
        full = torch.zeros(width, width, device="cuda")
        full_ms = triton.testing.do_bench(
            lambda: full.add_(torch.mm(rows.t(), rows, out_dtype=torch.float32)), return_mode="median"
        )
        whole = torch.mm(rows.t(), rows, out_dtype=torch.float32)
        symmetric = bool(torch.equal(whole, whole.t()))
        for tiles in (int(t) for t in args.tiles.split(",")):
            h = torch.zeros(width, width, device="cuda")
            ms = triton.testing.do_bench(lambda: upper_tiles(h, rows, tiles), return_mode="median")
            h.zero_()
            upper_tiles(h, rows, tiles)
            mask = h != 0
            equal = float((h[mask] == whole[mask]).float().mean())
            results.append({"width": width, "tiles": tiles, "ms": ms, "whole_ms": full_ms, "upper_values_bit_equal": equal,
                            "whole_product_exactly_symmetric": symmetric})  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
    lines = [f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.rows} rows of bf16 per update.", "",
             "| width | tiles | ms per update | whole product ms | upper values bit-equal to the whole product's | whole product symmetric |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['width']} | {r['tiles']} | {r['ms']:.3f} | {r['whole_ms']:.3f} | {r['upper_values_bit_equal']:.6f} "
              f"| {r['whole_product_exactly_symmetric']} |" for r in results]  # fmt: skip
    (args.out / "hessian.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (args.out / "hessian.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""GPTQ's solver alone on the GPU: one decoder layer's shared-input groups of a real architecture.

For the architecture in ``--config`` (Qwen3-8B by default) it builds each group's stacked weight (q/k/v,
o, gate/up, down; random, bf16) and a Hessian ``x^T x`` of random activations whose channels span several
magnitudes, then times:

1. the inverse-Cholesky factor the solver starts from (``gptq._inverse_cholesky``) against the textbook
   route it replaced (factorise ``H``, ``cholesky_inverse``, factorise the inverse), per input width, and
   its triangular inverse by halves (``gptq._inverse_lower``) against one triangular solve of the identity;
2. ``gptq_solve`` per group with the scheme's parameters (``--scheme``, from ``config/schemes.yaml``), after
   a warm-up solve, and their sum: one layer's solver time, times the layer count;
3. under ``torch.profiler``, the operators with the most GPU and CPU time over one layer's solves.

Prints Markdown and writes it, with the raw numbers, under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig

from quantbench.quant import gptq, gptq_kernel
from quantbench.quant.schemes import load_schemes

REPO = Path(__file__).resolve().parent.parent


def _timed(fn) -> tuple[float, object]:  # noqa: ANN001
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def _hessian(width: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    scales = torch.exp(torch.randn(width, device="cuda", generator=generator))
    x = (torch.randn(tokens, width, device="cuda", generator=generator) * scales).to(torch.bfloat16)
    return (x.T.float() @ x.float()) / tokens


def _textbook_inverse_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    damped = hessian.clone()
    damped.diagonal().add_(dampening * hessian.diagonal().mean())
    lower = torch.linalg.cholesky(damped)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / "qwen3-8b.json")
    parser.add_argument("--scheme", default="INT4-GPTQ")
    parser.add_argument("--tokens", type=int, default=16384, help="activation rows behind each Hessian")
    parser.add_argument("--block-rows", type=int, default=gptq_kernel.BLOCK_ROWS, help="rows per column-kernel program")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gptq_kernel.BLOCK_ROWS = args.block_rows
    config = AutoConfig.from_pretrained(args.config)
    scheme = load_schemes(REPO / "config" / "schemes.yaml")[args.scheme]
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * heads, config.num_key_value_heads * heads
    groups = {"q/k/v": (q + 2 * kv, hidden), "o": (hidden, q), "gate/up": (2 * inter, hidden), "down": (hidden, inter)}
    g = torch.Generator(device="cuda").manual_seed(0)
    hessians = {width: _hessian(width, args.tokens, g) for width in sorted({w for _, w in groups.values()})}
    weights = {
        name: (torch.randn(rows, width, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        for name, (rows, width) in groups.items()
    }

    cholesky = []
    for width, h in hessians.items():
        _timed(
            lambda: gptq._inverse_cholesky(h, scheme.params.dampening, scheme.params.damping_retry, [])
        )  # warm-up (cuSOLVER handles)
        _timed(lambda: _textbook_inverse_cholesky(h, scheme.params.dampening))
        new_s, (upper, _) = _timed(
            lambda: gptq._inverse_cholesky(h, scheme.params.dampening, scheme.params.damping_retry, [])
        )
        old_s, reference = _timed(lambda: _textbook_inverse_cholesky(h, scheme.params.dampening))
        diff = float((upper - reference).abs().max() / reference.abs().max())
        lower = torch.linalg.cholesky(h)
        identity = torch.eye(width, device="cuda")
        _timed(lambda: torch.linalg.solve_triangular(lower, identity, upper=False))
        solve_s, by_solve = _timed(lambda: torch.linalg.solve_triangular(lower, identity, upper=False))
        halves_s, by_halves = _timed(lambda: gptq._inverse_lower(lower))
        tri_diff = float((by_halves - by_solve).abs().max() / by_solve.abs().max())
        cholesky.append(
            {
                "width": width,
                "textbook_s": old_s,
                "one_factorisation_s": new_s,
                "max_rel_diff": diff,
                "triangular_solve_s": solve_s,
                "by_halves_s": halves_s,
                "halves_vs_solve_max_rel_diff": tri_diff,
            }
        )

    solve = lambda name: gptq.gptq_solve(weights[name], hessians[groups[name][1]], scheme.weights, scheme.params)  # noqa: E731
    for name in groups:
        solve(name)  # warm-up: kernels compiled, allocator primed
    solves = {name: _timed(lambda: solve(name))[0] for name in groups}
    layer_s = sum(solves.values())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for name in groups:
            solve(name)
        torch.cuda.synchronize()

    lines = [
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; config {args.config.name}; "
        f"scheme {args.scheme} ({scheme.params}); Hessians from {args.tokens} random tokens; column kernel "
        f"{gptq_kernel.BLOCK_ROWS} rows per program.",
        "",
        "| input width | factorise, invert, factorise s | one factorisation + triangular inverse s | max rel. difference "
        "| triangular inverse: one solve s | by halves s | max rel. difference |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {c['width']} | {c['textbook_s']:.4f} | {c['one_factorisation_s']:.4f} | {c['max_rel_diff']:.1e} "
            f"| {c['triangular_solve_s']:.4f} | {c['by_halves_s']:.4f} | {c['halves_vs_solve_max_rel_diff']:.1e} |"
            for c in cholesky
        ),
        "",
        "| group | weight | solve s |",
        "|---|---|---|",
        *(f"| {name} | {tuple(weights[name].shape)} | {s:.4f} |" for name, s in solves.items()),
        f"| **one layer** | | **{layer_s:.3f}** (x {config.num_hidden_layers} layers = {layer_s * config.num_hidden_layers:.1f} s) |",
        "",
        "```",
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60),
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60),
        "```",
    ]
    report = {"cholesky": cholesky, "solves_s": solves, "layer_s": layer_s, "layers": config.num_hidden_layers}
    (args.out / "solver.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (args.out / "solver.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

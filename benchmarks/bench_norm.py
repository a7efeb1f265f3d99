"""The fused RMSNorm of ``quant.norm_kernel`` against transformers' RMSNorm, alone and inside a decoder layer.

1. Per shape (Qwen3-8B's hidden-state norms ``tokens x 4096`` and its per-head q/k norms ``tokens x heads x 128``):
   median time of the module's own forward and of the kernel (``triton.testing.do_bench``), and how many
   outputs differ (they may, by one unit in the last place: only the float32 sum order differs).
2. One decoder layer of the architecture in ``--config`` (random init, bf16) on ``--tokens`` tokens as the
   pipeline's calibration chunks feed it (8 x 2048 by default): forward time with its own norms and inside
   ``fused_rms_norms``, and the relative difference of the outputs.

Prints a Markdown table and writes it, with the raw numbers, under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from transformers import AutoConfig
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from quantbench.quant import norm_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / "qwen3-8b.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(args.config)
    tokens = args.batch * args.seq_len
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    shapes = {
        "hidden": (tokens, config.hidden_size),
        "q heads": (tokens, config.num_attention_heads, config.head_dim),
        "k heads": (tokens, config.num_key_value_heads, config.head_dim),
    }
    for name, shape in shapes.items():
        norm = Qwen3RMSNorm(shape[-1], eps=config.rms_norm_eps).to("cuda", torch.bfloat16)
        norm.weight.data.normal_(1.0, 0.2, generator=g)
        x = (torch.randn(shape, device="cuda", generator=g) * 3).to(torch.bfloat16)
        expected, got = norm(x), norm_kernel.rms_norm(x, norm.weight, norm.variance_epsilon)
        own_ms = triton.testing.do_bench(lambda: norm(x), return_mode="median")
        fused_ms = triton.testing.do_bench(
            lambda: norm_kernel.rms_norm(x, norm.weight, norm.variance_epsilon), return_mode="median"
        )
        rows.append({"what": f"RMSNorm {name} {tuple(shape)}", "own_ms": own_ms, "fused_ms": fused_ms,
                     "differing": int((expected != got).sum()), "values": x.numel(),
                     "max_rel_diff": float(((expected.float() - got.float()).abs() / expected.float().abs().clamp(min=1e-30)).max())})  # fmt: skip

    torch.manual_seed(0)
    layer = Qwen3DecoderLayer(config, 0).to("cuda", torch.bfloat16).eval()
    for p in layer.parameters():
        p.data.normal_(0.0, 0.02, generator=g) if p.dim() > 1 else p.data.normal_(1.0, 0.2, generator=g)
    hidden = torch.randn(args.batch, args.seq_len, config.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    position_ids = torch.arange(args.seq_len, device="cuda")[None].expand(args.batch, -1)
    embeddings = Qwen3RotaryEmbedding(config).to("cuda")(hidden, position_ids)

    def forward() -> torch.Tensor:
        out = layer(hidden, position_embeddings=embeddings, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        expected = forward()
        own_ms = triton.testing.do_bench(forward, return_mode="median")
        with norm_kernel.fused_rms_norms(layer):
            got = forward()
            fused_ms = triton.testing.do_bench(forward, return_mode="median")
    rel = float((got.float() - expected.float()).norm() / expected.float().norm())
    rows.append({"what": f"decoder layer, {args.batch} x {args.seq_len} tokens", "own_ms": own_ms, "fused_ms": fused_ms,
                 "differing": int((expected != got).sum()), "values": expected.numel(), "output_rel_diff": rel})  # fmt: skip

    lines = [
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
        f"config {args.config.name}; bf16.",
        "",
        "| what | own forward ms | fused ms | speedup | outputs differing / total |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['what']} | {r['own_ms']:.3f} | {r['fused_ms']:.3f} | {r['own_ms'] / r['fused_ms']:.2f}x "
                     f"| {r['differing']} / {r['values']} |")  # fmt: skip
    lines.append("")
    lines.append(f"Decoder layer output, fused vs own norms: relative difference {rows[-1]['output_rel_diff']:.2e}.")
    (args.out / "norm.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (args.out / "norm.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

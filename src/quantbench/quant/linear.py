"""``QuantLinear``: a Linear layer held in its quantized form that simulates the scheme exactly.

The module stores what a compressed-tensors checkpoint stores (codes, ``weight_scale``, optional
``weight_zero_point`` and static ``input_scale``) and computes ``linear(qdq(x), dequant(codes))``, with
``qdq`` as vLLM runs the stored config (:func:`quantbench.serving.served_input_args`: dynamic fp8 inputs
per token) or with a per-tensor scale the caller gives (vLLM's fused MoE shares one across experts).
The quantizers produce it, the exporter reads it, and the runtime rebuilds it from a checkpoint, so
the weights a test evaluates are the weights that are written. On CUDA the input's quantize-dequantize
runs as one fused kernel (:mod:`quant.qdq_kernel`, bit-identical to :mod:`quant.qdq`'s torch code).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.quant import qdq, qdq_kernel
from quantbench.schemes import QuantArgs
from quantbench.serving import served_input_args


def fake_quantize_input(x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The input a QuantLinear computes with: the fused kernel where it runs, else the torch function."""
    if qdq_kernel.available(x.device) and qdq_kernel.supports(args):
        return qdq_kernel.fake_quantize_activation(x, args, input_scale)
    return qdq.quantize_dequantize_activation(x, args, input_scale)


class QuantLinear(nn.Module):
    """Linear with quantized weights and (optionally) quantize-dequantized inputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight_args: QuantArgs,
        input_args: QuantArgs | None = None,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_args = weight_args
        self.input_args = input_args  # as written to the checkpoint
        self._served_inputs = served_input_args(input_args)
        self._given_scale_inputs = None if input_args is None else replace(input_args, strategy="tensor", dynamic=False)
        scale_shape = qdq.scale_shape(out_features, in_features, weight_args)
        sdtype = qdq.scale_dtype(weight_args, dtype)
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=qdq.code_dtype(weight_args), device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=sdtype, device=device))
        zp_needed = weight_args.type == "int" and not weight_args.symmetric
        self.register_buffer(
            "weight_zero_point", torch.zeros(scale_shape, dtype=torch.int8, device=device) if zp_needed else None
        )
        static = input_args is not None and not input_args.dynamic
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        *,
        weight_args: QuantArgs,
        input_args: QuantArgs | None = None,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Build from already computed codes and parameters (``weight`` gives shape, dtype and device)."""
        module = cls(
            weight.shape[1],
            weight.shape[0],
            weight_args=weight_args,
            input_args=input_args,
            bias=bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        module.set_quantized(codes, scale, zero_point, input_scale=input_scale)
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def set_quantized(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        *,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        """Replace the stored codes and parameters (shapes and dtypes must match the scheme)."""
        self.weight_codes.copy_(codes.to(self.weight_codes.dtype))
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        if self.weight_zero_point is not None:
            if zero_point is None:
                raise ValueError("asymmetric weights need a zero point")
            self.weight_zero_point.copy_(zero_point.reshape(self.weight_zero_point.shape))
        if self.input_scale is not None:
            if input_scale is None:
                raise ValueError("static input quantization needs an input_scale")
            self.input_scale.copy_(input_scale.reshape(1))
        self._dequantized = None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this layer computes with, in ``dtype`` (cached until the next move or update)."""
        cached = self._dequantized
        if cached is None or cached.dtype != dtype or cached.device != self.weight_codes.device:
            cached = qdq.dequantize_weight(
                self.weight_codes, self.weight_scale, self.weight_zero_point, self.weight_args, dtype
            )
            self._dequantized = cached
        return cached

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module signature
        self._dequantized = None  # device/dtype moves invalidate the cache
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``linear(qdq(x), W)``; ``input_scale``: a per-tensor scale to quantize ``x`` with instead of the layer's own."""
        if input_scale is not None and self.input_args is not None:
            x = fake_quantize_input(x, self._given_scale_inputs, input_scale)
        elif self.input_args is not None:
            x = fake_quantize_input(x, self._served_inputs, self.input_scale)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        w = self.weight_args
        desc = f"{self.in_features}->{self.out_features}, w={w.type}{w.num_bits}/{w.strategy}"
        if self.input_args is not None:
            a = self.input_args
            desc += f", a={a.type}{a.num_bits}/{a.strategy}/{'dynamic' if a.dynamic else 'static'}"
        return desc

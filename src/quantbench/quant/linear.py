"""``QuantLinear``: a Linear layer held in its quantized form that simulates the scheme exactly.

The module stores what a compressed-tensors checkpoint stores (codes, ``weight_scale``, optional
``weight_zero_point`` and static ``input_scale``). The quantizers produce it, the exporter reads it, and the
runtime rebuilds it from a checkpoint, so the weights a test evaluates are the weights that are written.

It computes as vLLM's kernels do: int8 weights with int8 inputs (W8A8) multiply the integer codes exactly and
apply the scales in float32 (:func:`qdq.scaled_int_matmul`); every other scheme computes
``linear(qdq(x), dequant(codes))``, with ``qdq`` as vLLM runs the stored config
(:func:`quantbench.checkpoint.serving.served_input_args`: dynamic fp8 inputs per token) or with a per-tensor scale the
caller gives (vLLM's fused MoE shares one across experts). On CUDA the inputs' quantization runs as one
fused kernel (:mod:`quant.qdq_kernel`, bit-identical to :mod:`quant.qdq`'s torch code), and linears that
read one input tensor with the same activation args (q/k/v; gate/up) can share its quantize-dequantize
(:func:`share_input_quantization`): computed once, not once per linear.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.checkpoint.serving import served_input_args
from quantbench.quant import qdq, qdq_kernel
from quantbench.quant.schemes import QuantArgs


def fake_quantize_input(x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The input a QuantLinear computes with: the fused kernel where it runs, else the torch function."""
    if args.type == "float" and qdq_kernel.available(x.device) and qdq_kernel.supports(args):
        return qdq_kernel.fake_quantize_activation(x, args, input_scale)
    return qdq.quantize_dequantize_activation(x, args, input_scale)


class SharedInputQuantization:
    """The quantized input (fake-quantized tensor, or W8A8's codes and scales) of one input tensor, for the
    ``members`` linears that read it in turn.

    The first member's call computes it; the others get the same result while they are called with the
    same, unmodified tensor (identity and version); the last one's call drops it. Any other input is
    computed afresh, so a call order other than the expected one costs time, never correctness.
    """

    def __init__(self, members: int) -> None:
        self.members = members
        self._source: torch.Tensor | None = None
        self._version = -1
        self._result: Any = None
        self._left = 0

    def __call__(self, x: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        if self._left == 0 or x is not self._source or x._version != self._version:
            self._source, self._version, self._result, self._left = x, x._version, compute(x), self.members
        result = self._result
        self._left -= 1
        if self._left == 0:
            self._source = self._result = None
        return result


def share_input_quantization(linears: Sequence[QuantLinear]) -> bool:
    """Let ``linears`` (called in this order on one input tensor) share its quantize-dequantize; only when they
    quantize their input with the same args and static scale. Returns whether they now share it."""
    if len(linears) < 2 or any(not isinstance(m, QuantLinear) or m.input_args is None for m in linears):
        return False
    first = linears[0]
    for other in linears[1:]:
        if other.input_args != first.input_args or (other.input_scale is None) != (first.input_scale is None):
            return False
        if first.input_scale is not None and not torch.equal(other.input_scale, first.input_scale):
            return False
    shared = SharedInputQuantization(len(linears))
    for linear in linears:
        linear.shared_input = shared
    return True


def input_codes(
    x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and scales of a QuantLinear's input: the fused kernel where it runs, else the torch function."""
    if qdq_kernel.available(x.device) and qdq_kernel.supports(args):
        return qdq_kernel.int_activation_codes(x, args, input_scale)
    return qdq.int_activation_codes(x, args, input_scale)


def scaled_int_linear(
    codes: torch.Tensor,
    scale: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`qdq.scaled_int_matmul`, with its float32 epilogue in one fused kernel where it runs (bit-identical)."""
    if qdq_kernel.available(codes.device) and dtype in qdq_kernel.SCALED_DTYPES:
        sums = qdq.int_product_sums(codes, weight_codes)
        out = qdq_kernel.scale_int_sums(sums, scale, weight_scale, bias, dtype)
        return out.reshape(*codes.shape[:-1], weight_codes.shape[0])
    return qdq.scaled_int_matmul(codes, scale, weight_codes, weight_scale, bias, dtype)


def is_w8a8_int(weight_args: QuantArgs, input_args: QuantArgs | None) -> bool:
    """Whether a layer runs vLLM's W8A8 integer GEMM: symmetric int8 per-channel or per-tensor weights, int8 inputs."""
    return (
        input_args is not None
        and input_args.type == "int"
        and input_args.num_bits == 8
        and input_args.symmetric
        and weight_args.type == "int"
        and weight_args.num_bits == 8
        and weight_args.symmetric
        and weight_args.strategy in ("channel", "tensor")
    )


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
        self.register_buffer(
            "weight_codes", torch.zeros(out_features, in_features, dtype=qdq.code_dtype(weight_args), device=device)
        )
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=sdtype, device=device))
        zp_needed = weight_args.type == "int" and not weight_args.symmetric
        self.register_buffer(
            "weight_zero_point", torch.zeros(scale_shape, dtype=torch.int8, device=device) if zp_needed else None
        )
        static = input_args is not None and not input_args.dynamic
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._dequantized: torch.Tensor | None = None
        self.shared_input: SharedInputQuantization | None = None

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
        if is_w8a8_int(self.weight_args, self.input_args):
            codes, scale = (
                self._input_codes(x) if self.shared_input is None else self.shared_input(x, self._input_codes)
            )
            return scaled_int_linear(codes, scale, self.weight_codes, self.weight_scale, self.bias, x.dtype)
        if input_scale is not None and self.input_args is not None:
            x = fake_quantize_input(x, self._given_scale_inputs, input_scale)
        elif self.input_args is not None:
            x = self._quantize_input(x) if self.shared_input is None else self.shared_input(x, self._quantize_input)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_input(x, self._served_inputs, self.input_scale)

    def _input_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return input_codes(x, self.input_args, self.input_scale)

    def extra_repr(self) -> str:
        w = self.weight_args
        desc = f"{self.in_features}->{self.out_features}, w={w.type}{w.num_bits}/{w.strategy}"
        if self.input_args is not None:
            a = self.input_args
            desc += f", a={a.type}{a.num_bits}/{a.strategy}/{'dynamic' if a.dynamic else 'static'}"
        return desc

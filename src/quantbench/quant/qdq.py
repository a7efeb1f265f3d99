"""Quantize and dequantize tensors: integer (symmetric/asymmetric) and fp8 e4m3, the numerics of every scheme.

Conventions follow compressed-tensors so that exported checkpoints mean what this code computed:

- Integer codes span the signed range [-2**(b-1), 2**(b-1) - 1] for symmetric *and* asymmetric args;
  an asymmetric zero point lives in that same signed range. ``dequant = (q - zero_point) * scale``.
- Weight scales: symmetric ``amax / ((qmax - qmin) / 2)``; asymmetric ``(max - min) / (qmax - qmin)`` with
  the range widened to include 0. A zero range gives scale 1 (never 0, NaN or Inf). A scheme's
  :class:`~quantbench.quant.schemes.Rounding` can pick AngelSlim's formulas instead (``amax / qmax``; the raw
  ``[min, max]`` range; codes from the quotient rounded to the weight's dtype).
- Scales are rounded to their storage dtype *before* the codes are computed, so that dequantizing the stored
  tensors reproduces the simulated weights exactly: int scales use the model dtype, fp8 scales float32.
- Dynamic activation scales are what vLLM's kernels compute per token: ``amax / 127`` (int8) and
  ``amax / 448`` (fp8); a static input scale is ``absmax over all calibration tokens / 448``.
- Integer activation codes follow vLLM's CUDA kernels (``csrc/quantization/w8a8/int8/scaled_quant.cu``):
  dynamic ``round(x * (127 / amax))`` (a float32 multiplication by the float32 quotient ``127 / amax``,
  0 for an all-zero token), static ``round(x / scale)``; rounding half to even, saturating to [-128, 127].
  The rounding direction of the many bf16 inputs that sit exactly on a half step depends on that form.
  Integer-activation linears then multiply the codes exactly (:func:`scaled_int_matmul`).

Shapes: per-tensor scales are ``[1]``, per-channel ``[out, 1]``, per-group ``[out, in / group_size]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantbench.quant.schemes import QuantArgs, Rounding

COMPRESSED_TENSORS = Rounding()  # the default rounding: compressed-tensors' conventions

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def scale_dtype(args: QuantArgs, model_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the scales of ``args``: float32 for fp8, the model's dtype for integers."""
    return torch.float32 if args.type == "float" else model_dtype


def code_dtype(args: QuantArgs) -> torch.dtype:
    """Storage dtype of quantized codes: fp8 e4m3 for float, int8 for integers (int4 packed at export)."""
    return FP8_DTYPE if args.type == "float" else torch.int8


def grouped_view(weight: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View ``weight [out, in]`` as ``[out, n_reduce, width]`` where each scale covers one ``width`` slice."""
    out_features, in_features = weight.shape
    if args.strategy == "tensor":
        return weight.reshape(1, 1, -1)
    if args.strategy == "channel":
        return weight.reshape(out_features, 1, in_features)
    if in_features % args.group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {args.group_size}")
    return weight.reshape(out_features, in_features // args.group_size, args.group_size)


def scale_shape(out_features: int, in_features: int, args: QuantArgs) -> tuple[int, ...]:
    """Shape of the stored weight scale (and zero point) of an ``[out, in]`` weight."""
    if args.strategy == "tensor":
        return (1,)
    if args.strategy == "channel":
        return (out_features, 1)
    return (out_features, in_features // args.group_size)


def qparams_from_minmax(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    args: QuantArgs,
    dtype: torch.dtype,
    rounding: Rounding = COMPRESSED_TENSORS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (in ``dtype``) and zero point (int8, asymmetric only) covering ``[min_val, max_val]``."""
    raw_range = args.type == "int" and not args.symmetric and rounding.asymmetric_range == "minmax"
    min_val, max_val = min_val.float(), max_val.float()
    if not raw_range:
        min_val, max_val = torch.clamp(min_val, max=0.0), torch.clamp(max_val, min=0.0)
    if args.type == "float":
        scale = torch.maximum(-min_val, max_val) / FP8_MAX
    elif args.symmetric:
        divisor = args.qmax if rounding.symmetric_scale == "qmax" else (args.qmax - args.qmin) / 2
        scale = torch.maximum(-min_val, max_val) / divisor
    elif raw_range:
        scale = (max_val - min_val).clamp(min=1e-5) / (args.qmax - args.qmin)
    else:
        scale = (max_val - min_val) / (args.qmax - args.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(dtype)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    if args.type == "float" or args.symmetric:
        return scale, None
    zero_point = torch.round(args.qmin - min_val / scale.float()).clamp(args.qmin, args.qmax)
    return scale, zero_point.to(torch.int8)


def weight_qparams(
    weight: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None, rounding: Rounding = COMPRESSED_TENSORS
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale and zero point of ``weight [out, in]`` for its strategy, shaped for storage."""
    grouped = grouped_view(weight.float(), args)
    scale, zero_point = qparams_from_minmax(
        grouped.amin(dim=-1), grouped.amax(dim=-1), args, dtype or scale_dtype(args, weight.dtype), rounding
    )
    shape = scale_shape(*weight.shape, args)
    return scale.reshape(shape), None if zero_point is None else zero_point.reshape(shape)


def _expand(param: torch.Tensor, weight: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Broadcast a stored scale/zero point to the grouped view of ``weight``."""
    return param.reshape(grouped_view(torch.empty(weight.shape, device="meta"), args).shape[:-1] + (1,))


def round_to_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, args: QuantArgs
) -> torch.Tensor:
    """Integer codes (as float32) of float32 ``x`` under broadcastable float32 ``scale``/``zero_point``.

    The one rounding rule of every integer quantizer (RTN, GPTQ's column loop, AWQ's search).
    """
    return torch.clamp(torch.round(x / scale + zero_point), args.qmin, args.qmax)


def codes_to_values(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    """Float32 values of float32 integer ``codes``: ``(codes - zero_point) * scale``."""
    return (codes - zero_point) * scale


def quantize_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantArgs,
    rounding: Rounding = COMPRESSED_TENSORS,
) -> torch.Tensor:
    """Codes of ``weight [out, in]`` under the stored ``scale``/``zero_point`` (int8 or fp8 e4m3)."""
    grouped = grouped_view(weight.float(), args)
    s = _expand(scale, weight, args).float()
    if args.type == "float":
        codes = torch.clamp(grouped / s, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    else:
        zp = 0.0 if zero_point is None else _expand(zero_point, weight, args).float()
        if rounding.divide_in == "weight_dtype":  # AngelSlim: round(w / scale) of weight-dtype tensors, then + zp
            grouped = torch.round((grouped / s).to(weight.dtype).float())
            s = torch.ones_like(s)
        codes = round_to_codes(grouped, s, zp, args).to(torch.int8)
    return codes.reshape(weight.shape)


def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantArgs,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Weights represented by ``codes`` and their stored parameters, in ``dtype``."""
    zp = 0.0 if zero_point is None else _expand(zero_point, codes, args).float()
    values = codes_to_values(grouped_view(codes.float(), args), _expand(scale, codes, args).float(), zp)
    return values.reshape(codes.shape).to(dtype)


def fake_quantize_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantArgs,
    rounding: Rounding = COMPRESSED_TENSORS,
) -> torch.Tensor:
    """Quantize-dequantize ``weight`` (same dtype out) under given parameters."""
    codes = quantize_weight(weight, scale, zero_point, args, rounding)
    return dequantize_weight(codes, scale, zero_point, args, weight.dtype)


def static_input_scale(absmax: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Per-tensor static input scale from the absolute maximum over all calibration tokens (float32, ``[1]``)."""
    qmax = FP8_MAX if args.type == "float" else float(args.qmax)
    scale = absmax.float().reshape(1) / qmax
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))


def int_activation_codes(
    x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (float32 values) of ``x [..., in]`` and their float32 scales, as vLLM's CUDA kernels
    compute them (module docstring): dynamic per token (scales ``[..., 1]``) or per tensor, or static
    (``input_scale``, ``[1]``). Divisions are tensor by tensor, IEEE on every device (torch turns a division
    by a Python number into a multiplication by its reciprocal on CUDA)."""
    xf = x.float()
    if args.dynamic:
        dims = -1 if args.strategy == "token" else tuple(range(xf.dim()))
        absmax = xf.abs().amax(dim=dims, keepdim=True)
        qmax = torch.full_like(absmax, float(args.qmax))
        scale = absmax / qmax
        quotient = xf * torch.where(absmax > 0, qmax / absmax, torch.zeros_like(absmax))
    else:
        if input_scale is None:
            raise ValueError("static activation quantization needs an input_scale")
        scale = input_scale.float()
        quotient = xf / scale
    return torch.clamp(torch.round(quotient), args.qmin, args.qmax), scale


def quantize_dequantize_activation(
    x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Simulate the runtime's activation quantization of ``x [..., in]``: static per-tensor or dynamic per token."""
    if args.type == "int":
        codes, scale = int_activation_codes(x, args, input_scale)
        return (codes * scale).to(x.dtype)
    xf = x.float()
    if args.dynamic:
        dims = -1 if args.strategy == "token" else tuple(range(xf.dim()))
        scale = xf.abs().amax(dim=dims, keepdim=True) / FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        if input_scale is None:
            raise ValueError("static activation quantization needs an input_scale")
        scale = input_scale.float()
    q = torch.clamp(xf / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    return (q * scale).to(x.dtype)


def scaled_int_matmul(
    codes: torch.Tensor,
    scale: torch.Tensor,
    weight_codes: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``linear`` of integer activation ``codes [..., in]`` (scales ``scale``) with int8 ``weight_codes [out, in]``
    (per-channel or per-tensor ``weight_scale``), as vLLM's W8A8 kernels compute it: the codes' products
    summed exactly in int32, then ``scale * (weight_scale * sum)`` in float32 (+ bias), rounded once to
    ``dtype`` (CUDA: cutlass ``ScaledEpilogue``; CPU: oneDNN with the per-channel scale, then the token
    scale). ``torch._int_mm`` is exact; on CUDA it wants more than 16 rows (fewer, as in decoding, are padded
    with zero rows) and widths that are multiples of 8. Where it cannot run, a float32 matmul of the codes is
    exact as long as every partial sum stays below 2**24.
    """
    sums = int_product_sums(codes, weight_codes).float()
    y = scale.float().reshape(-1, 1) * (weight_scale.float().reshape(1, -1) * sums)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype).reshape(*codes.shape[:-1], weight_codes.shape[0])


def int_product_sums(codes: torch.Tensor, weight_codes: torch.Tensor) -> torch.Tensor:
    """The exact sums of products of ``codes [..., in]`` (rows flattened) and int8 ``weight_codes [out, in]``:
    int32 ``[rows, out]`` from ``torch._int_mm`` where it runs, else float32 (see :func:`scaled_int_matmul`)."""
    rows = codes.reshape(-1, codes.shape[-1])
    if _int_mm_runs(rows, weight_codes):
        count = rows.shape[0]
        if rows.device.type == "cuda" and count <= _INT_MM_MIN_ROWS:
            rows = F.pad(rows, (0, 0, 0, _INT_MM_MIN_ROWS + 1 - count))
        return torch._int_mm(rows.to(torch.int8), weight_codes.t())[:count]
    return rows.float() @ weight_codes.t().float()


_INT_MM_MIN_ROWS = 16  # CUDA's torch._int_mm takes more rows than this


def _int_mm_runs(rows: torch.Tensor, weight_codes: torch.Tensor) -> bool:
    if rows.device.type != "cuda":
        return rows.device.type == "cpu"
    return rows.shape[1] % 8 == 0 and weight_codes.shape[0] % 8 == 0

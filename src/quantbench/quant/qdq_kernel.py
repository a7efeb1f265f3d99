"""Activation quantization in one pass on CUDA: the Triton twin of :func:`qdq.quantize_dequantize_activation`
(fp8) and :func:`qdq.int_activation_codes` (integer codes for the exact W8A8 product).

The torch functions upcast the input to float32 and make about eight passes over it (abs, amax, divide,
clamp, cast or round, multiply, cast back), which made activation-quantized models run at about half the
speed of BF16 in the simulated runtime. Here one program handles one row (token) of ``x [rows, width]``:
it reads the row once for its absolute maximum (dynamic per-token scales) and once more, from cache, to
write the result; a static scale skips the first read. The row width is a compile-time constant (a model
has a handful of input widths, each compiled once).

The arithmetic is the torch functions', bit for bit: the input is upcast to float32 exactly; fp8: the dynamic
scale is ``amax / 448`` computed as torch computes it on the same device (on CUDA torch multiplies by the
float32 reciprocal of a Python-number divisor, on the CPU it divides; 1 where the row is all zeros), ``x / scale``
an IEEE round-to-nearest division (``div_rn``) like torch's tensor division, clamped to +-448 and rounded to the
e4m3 grid, and the result ``codes * scale`` in float32, rounded once to the input's dtype. Integer codes: the
dynamic scale is ``div_rn(amax, qmax)`` and the codes ``round(x * div_rn(qmax, amax))`` (0 for an all-zero row),
a static scale's ``round(div_rn(x, scale))``, rounded half-to-even and clamped to ``[qmin, qmax]``, written as
int8 with the float32 row scales. The kernel is compiled without fused multiply-adds: the rounding below adds a
constant to ``x * inverse``, and an FMA would round the exact product instead of its float32 value, as vLLM's
kernel does. Every rounding is written out in float32 arithmetic (power-of-two steps, the 1.5 * 2**23 trick)
rather than left to dtype casts: Triton's interpreter, which the tests run on CPU, casts to fp8 and bf16 with
other rounding than the GPU and torch, and no fp8 hardware is needed. Inputs are assumed finite: a row holding
NaN gets other values than the torch path gives it.

Covers static scales and dynamic per-token scales; dynamic per-tensor scales stay on the torch path.
"""

from __future__ import annotations

import torch

from quantbench.quant.qdq import FP8_MAX
from quantbench.quant.schemes import QuantArgs
from quantbench.quant.triton_support import available, tl, triton

__all__ = ["available", "fake_quantize_activation", "int_activation_codes", "scale_int_sums", "supports"]

SCALED_DTYPES = (torch.bfloat16, torch.float32)  # outputs scale_int_sums writes

MAX_BLOCK = 4096  # elements of a row handled per loop step

if triton is not None:

    @triton.jit
    def _with_sign_of(magnitude, value):
        """``magnitude`` (float32, >= 0) carrying the sign bit of ``value``, so that -0.0 stays -0.0 as in torch."""
        sign = value.to(tl.uint32, bitcast=True) & 0x80000000
        return (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_half_even(v):
        """Nearest integer of float32 ``v`` (``|v| < 2**22``), ties to even, the sign of zero kept."""
        return _with_sign_of(tl.abs((v + 12582912.0) - 12582912.0), v)  # 1.5 * 2**23

    @triton.jit
    def _round_to_e4m3(v):
        """Nearest fp8 e4m3 value of float32 ``v`` (``|v| <= 448``), ties to even: torch's cast, in float32.

        The step of e4m3 on ``[2**e, 2**(e+1))`` is ``2**(e-3)``, and ``2**-9`` below ``2**-6`` (subnormals);
        dividing by a power of two is exact, so rounding ``|v| / step`` to an integer is the cast.
        """
        exponent = tl.maximum((v.to(tl.uint32, bitcast=True) >> 23) & 0xFF, 121)  # biased; 121: 2**-6
        step = ((exponent - 3) << 23).to(tl.float32, bitcast=True)
        inverse = ((257 - exponent) << 23).to(tl.float32, bitcast=True)
        return _with_sign_of(_round_half_even(tl.abs(v) * inverse) * step, v)

    @triton.jit
    def round_to_bf16(v):
        """Float32 ``v`` rounded to the nearest bfloat16 value (ties to even), still as float32; finite ``v``."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _qdq_rows_kernel(
        x_ptr, out_ptr, scale_ptr, stride_x, stride_out, qmax, qmin, inverse_qmax,
        WIDTH: tl.constexpr, DYNAMIC: tl.constexpr, RECIPROCAL: tl.constexpr, FP8: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """fp8: ``out`` gets qdq(x) in x's dtype. Integer: ``out`` gets the int8 codes and, if dynamic, ``scale``
        (one float32 per row) the row's scale; a static scale is read from ``scale``."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        out_row = out_ptr + row * stride_out
        offsets = tl.arange(0, BLOCK)
        inverse = 0.0
        if DYNAMIC:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, WIDTH, BLOCK):
                cols = start + offsets
                x = tl.load(x_row + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            amax = tl.max(amax, axis=0)
            if FP8:
                if RECIPROCAL:  # torch on CUDA divides by a Python number as a multiplication by its reciprocal
                    scale = amax * inverse_qmax
                else:
                    scale = tl.math.div_rn(amax, qmax)
                scale = tl.where(scale > 0, scale, 1.0)
            else:
                scale = tl.math.div_rn(amax, qmax)
                inverse = tl.where(amax > 0, tl.math.div_rn(qmax, tl.where(amax > 0, amax, 1.0)), 0.0)
                tl.store(scale_ptr + row, scale)
        else:
            scale = tl.load(scale_ptr).to(tl.float32)
        for start in range(0, WIDTH, BLOCK):
            cols = start + offsets
            x = tl.load(x_row + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
            if FP8:
                v = tl.math.div_rn(x, scale)
                y = _round_to_e4m3(tl.minimum(tl.maximum(v, qmin), qmax)) * scale
                if out_ptr.dtype.element_ty == tl.bfloat16:
                    y = round_to_bf16(y)  # then the cast below is exact, whatever rounding it uses
                tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=cols < WIDTH)
            else:
                v = x * inverse if DYNAMIC else tl.math.div_rn(x, scale)
                q = tl.minimum(
                    tl.maximum(_round_half_even(tl.minimum(tl.maximum(v, qmin - 1.0), qmax + 1.0)), qmin), qmax
                )
                tl.store(out_row + cols, q.to(tl.int8), mask=cols < WIDTH)

    @triton.jit
    def _scale_sums_kernel(
        sums_ptr, token_scale_ptr, weight_scale_ptr, bias_ptr, out_ptr, width, stride_sums, stride_out,
        token_scale_stride, weight_scale_stride, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One row block of ``out = scale * (weight_scale * float32(sums)) (+ bias)`` (float32), cast to out's dtype."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        sums = tl.load(sums_ptr + row * stride_sums + cols, mask=mask, other=0).to(tl.float32)
        weight_scale = tl.load(weight_scale_ptr + cols * weight_scale_stride, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(token_scale_ptr + row * token_scale_stride).to(tl.float32) * (weight_scale * sums)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            y = round_to_bf16(y)  # then the cast below is exact, whatever rounding it uses
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def supports(args: QuantArgs) -> bool:
    """Whether the kernel implements these activation args: static, or dynamic per-token scales."""
    return not args.dynamic or args.strategy == "token"


def fake_quantize_activation(x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``qdq.quantize_dequantize_activation(x, args, input_scale)`` of fp8 args, bit for bit, in one kernel launch.

    Needs :func:`available` for ``x.device`` and :func:`supports` for ``args``.
    """
    if args.type != "float":
        raise ValueError("the fused kernel writes integer activations as codes: use int_activation_codes")
    out, _ = _launch(x, args, input_scale)
    return out


def int_activation_codes(
    x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qdq.int_activation_codes(x, args, input_scale)`` of integer args in one kernel launch: the same codes
    (as int8) and bit-identical float32 scales. Needs :func:`available` and :func:`supports`."""
    if args.type != "int":
        raise ValueError("int_activation_codes takes integer activation args")
    return _launch(x, args, input_scale)


def scale_int_sums(
    sums: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The epilogue of :func:`qdq.scaled_int_matmul` in one kernel launch, bit for bit: ``sums [rows, out]`` (int32
    or float32, rows may be strided) times the per-channel or per-tensor ``weight_scale``, then the per-token
    or per-tensor ``scale``, in float32, plus ``bias``, rounded once to ``dtype`` (one of :data:`SCALED_DTYPES`).
    The torch expression is five passes over the output; decoding runs it for every linear of every step."""
    if dtype not in SCALED_DTYPES:
        raise ValueError(f"scale_int_sums writes {SCALED_DTYPES}, not {dtype}")
    rows, width = sums.shape
    weight_scale = weight_scale.reshape(-1)
    scale = scale.reshape(-1)
    if sums.stride(-1) != 1:
        sums = sums.contiguous()
    out = torch.empty(rows, width, dtype=dtype, device=sums.device)
    block = min(triton.next_power_of_2(max(width, 16)), 1024)
    if rows:
        _scale_sums_kernel[(rows, triton.cdiv(width, block))](
            sums, scale, weight_scale, bias if bias is not None else scale, out, width, sums.stride(0), out.stride(0),
            0 if scale.numel() == 1 else 1, 0 if weight_scale.numel() == 1 else 1,
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
    return out


def _launch(
    x: torch.Tensor, args: QuantArgs, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not supports(args):
        raise ValueError(f"the fused activation kernel does not cover dynamic {args.strategy} scales")
    if not args.dynamic and input_scale is None:
        raise ValueError("static activation quantization needs an input_scale")
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    fp8 = args.type == "float"
    out = torch.empty(rows.shape, dtype=x.dtype if fp8 else torch.int8, device=x.device)
    scales = None
    if not fp8:
        scales = (
            torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device) if args.dynamic else input_scale.float()
        )
    qmax = FP8_MAX if fp8 else float(args.qmax)
    block = min(triton.next_power_of_2(max(width, 16)), MAX_BLOCK)
    scale_arg = input_scale if not args.dynamic else (scales if not fp8 else rows)
    if rows.shape[0]:
        _qdq_rows_kernel[(rows.shape[0],)](
            rows, out, scale_arg, rows.stride(0), out.stride(0),
            qmax, -FP8_MAX if fp8 else float(args.qmin), float(torch.tensor(1.0) / torch.tensor(qmax)),
            WIDTH=width, DYNAMIC=args.dynamic, RECIPROCAL=x.is_cuda, FP8=fp8, BLOCK=block,
            num_warps=4 if block <= 1024 else 8, enable_fp_fusion=False,
        )  # fmt: skip
    out = out.reshape(x.shape)
    if scales is not None and args.dynamic:
        scales = scales.reshape(*x.shape[:-1], 1)
    return out, scales

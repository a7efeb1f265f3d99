"""Round-to-nearest: min-max parameters (rounded as the scheme says), no data, the baseline every other algorithm must beat."""

from __future__ import annotations

import torch
from torch import nn

from quantbench.quant import qdq
from quantbench.quant.linear import QuantLinear
from quantbench.quant.schemes import Scheme


def rtn_quantize_linear(
    linear: nn.Linear, scheme: Scheme, *, input_scale: torch.Tensor | None = None, weight: torch.Tensor | None = None
) -> QuantLinear:
    """A QuantLinear holding ``weight`` (default: ``linear.weight``) rounded to nearest under ``scheme``.

    ``weight`` lets a caller pass a transformed weight (AWQ's scaled one) while keeping ``linear``'s bias.
    """
    if scheme.weights is None:
        raise ValueError(f"scheme {scheme.name} quantizes no weights")
    weight = linear.weight.data if weight is None else weight
    scale, zero_point = qdq.weight_qparams(weight, scheme.weights, rounding=scheme.rounding)
    codes = qdq.quantize_weight(weight, scale, zero_point, scheme.weights, scheme.rounding)
    return QuantLinear.from_weight(
        weight,
        codes,
        scale,
        zero_point,
        weight_args=scheme.weights,
        input_args=scheme.input_activations,
        input_scale=input_scale,
        bias=None if linear.bias is None else linear.bias.data,
    )

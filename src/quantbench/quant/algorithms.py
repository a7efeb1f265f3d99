"""The weight-quantization algorithms (rtn, gptq, awq): one object each, registered by name.

A scheme names its algorithm (``algorithm: gptq``) and holds that algorithm's parameters (``Scheme.params``:
the dataclass of its ``gptq:`` or ``awq:`` section; RTN has none). Whatever depends on the algorithm asks its
:class:`Algorithm` (:func:`get_algorithm`) instead of testing the name:

- the schemes file (:mod:`quantbench.quant.schemes`): the parameters' dataclass (``params``), whether the
  algorithm needs calibration data (``needs_data``), needs integer weights (``integer_weights``) and follows
  the scheme's ``rounding`` (``follows_rounding``);
- job sizing (:mod:`quantbench.run.sizing`): quantize minutes per billion parameters (``minutes_per_b``);
- the layer-by-layer pipeline (:mod:`quantbench.quant.sequential`): which statistics of a group's shared input
  it needs (:meth:`Algorithm.statistics`), what it does to a block before rounding (:meth:`Algorithm.smoothing`:
  AWQ's scales) and how it quantizes a group of linears that share one input (:meth:`Algorithm.quantize_group`).

This module imports no torch, so the schemes file and the workflow's DAG build read the registry cheaply; the
numerics (:mod:`quant.rtn`, :mod:`quant.gptq`, :mod:`quant.awq`) load when a group is first quantized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from quantbench.util.errors import QuantbenchError
from quantbench.util.specfile import check_choice

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantbench.model.architectures import BlockStack
    from quantbench.quant.awq import Smoothing
    from quantbench.quant.linear import QuantLinear
    from quantbench.quant.schemes import Scheme
    from quantbench.quant.sequential import Group

DEAD_COLUMNS = ("round", "zero")
DAMPING_RETRIES = ("multiply", "add")
AWQ_STYLES = ("quantbench", "angelslim")


@dataclass(frozen=True)
class GPTQParams:
    """GPTQ solver settings: damping is a fraction of mean(diag(H)); act_order processes columns by descending
    diag(H) (the group parameters stay those of the original contiguous groups, as llm-compressor's ``static``).

    Edge cases, quantbench's way first (the published recipe's second; docs/fidelity.md):
    ``dead_columns`` (inputs never active, ``diag(H) == 0``): ``round`` them to nearest, or ``zero`` those
    weight columns before the group parameters are taken. ``damping_retry`` after a failed Cholesky:
    ``multiply`` the damping by 10, or ``add`` 0.01 to the fraction and damp the already damped matrix again.
    """

    dampening: float = 0.01
    block_size: int = 128
    act_order: bool = True
    dead_columns: str = "round"
    damping_retry: str = "multiply"

    def __post_init__(self) -> None:
        check_choice("dead_columns", self.dead_columns, DEAD_COLUMNS)
        check_choice("damping_retry", self.damping_retry, DAMPING_RETRIES)


@dataclass(frozen=True)
class AWQParams:
    """AWQ search settings: ``grid_size`` points of the scale exponent in [0, 1); optional clipping search.

    ``style`` picks the algorithm (module docstring of :mod:`quantbench.quant.awq`): ``quantbench`` (each
    mapping's linear outputs as the loss, every mapping folded) or ``angelslim`` (AngelSlim 4cc21d9's: the
    attention / MLP block output as the loss, only the norm mappings folded; AngelSlim also propagated
    full-precision outputs, which ``calibration.propagation`` selects for any scheme). ``duo_scaling`` divides the activation term by a weight-magnitude
    term (AutoAWQ's and llm-compressor's default); unset, it is on for ``quantbench`` and off for
    ``angelslim``, whose candidates have no weight term.
    """

    style: str = "quantbench"
    grid_size: int = 20
    duo_scaling: bool | None = None
    clip_search: bool = False
    clip_grid: int = 20
    clip_max_shrink: float = 0.5

    def __post_init__(self) -> None:
        check_choice("style", self.style, AWQ_STYLES)
        if self.duo_scaling is None:
            object.__setattr__(self, "duo_scaling", self.style == "quantbench")
        if self.style == "angelslim" and (self.duo_scaling or self.clip_search):
            raise ValueError(
                "style 'angelslim' searches x_mean^r without a weight term and without clipping; "
                "leave duo_scaling and clip_search unset or false"
            )


@dataclass(frozen=True)
class Statistics:
    """What an algorithm needs of a group's shared input, beyond the static input ranges a scheme may need:
    the Hessian ``sum x^T x`` and the per-channel ``sum |x|`` (:class:`quantbench.quant.observers.InputStats`)."""

    hessian: bool = False
    abs_sum: bool = False


class Algorithm:
    """What quantbench asks of a weight-quantization algorithm (module docstring); subclasses set ``name`` and
    ``minutes_per_b``, implement :meth:`quantize_group` and override what differs from the defaults."""

    name: ClassVar[str]
    params: ClassVar[type | None] = None  # the dataclass of the scheme's ``<name>:`` section
    needs_data: ClassVar[bool] = True  # calibration data, whatever the scheme's input activations
    integer_weights: ClassVar[bool] = True  # only integer weight types
    follows_rounding: ClassVar[bool] = True  # takes its min-max parameters and codes as the scheme's ``rounding`` says
    minutes_per_b: ClassVar[float]  # quantize wall time per billion parameters on one GPU (sizing rule)

    def statistics(self, scheme: Scheme, *, smoothed: bool) -> Statistics:
        """The statistics a group needs (``smoothed``: the group's linears are smoothed, :meth:`smoothing`)."""
        return Statistics()

    def smoothing(
        self, block: nn.Module, name: str, stack: BlockStack, scheme: Scheme, *, routed: bool
    ) -> Smoothing | None:
        """What the algorithm does to ``block`` (named ``name``, ``stack`` expanded for it) before rounding, or None.

        ``routed``: the block's experts calibrate on routed tokens only (``calibration.experts: routed``).
        """
        return None

    def quantize_group(
        self,
        group: Group,
        linears: Sequence[nn.Linear],
        scheme: Scheme,
        stack: BlockStack,
        input_scale: torch.Tensor | None,
    ) -> list[QuantLinear]:
        """The QuantLinear of each of ``linears`` (the members of ``group``, which share one input and its
        statistics, with the static ``input_scale`` if the scheme has one); a fallback taken is appended to
        ``group.report.fallbacks``."""
        raise NotImplementedError


class RTN(Algorithm):
    """Round-to-nearest (:mod:`quantbench.quant.rtn`): min-max parameters, no data; any weight type."""

    name = "rtn"
    needs_data = False
    integer_weights = False
    minutes_per_b = 1.0

    def quantize_group(
        self,
        group: Group,
        linears: Sequence[nn.Linear],
        scheme: Scheme,
        stack: BlockStack,
        input_scale: torch.Tensor | None,
    ) -> list[QuantLinear]:
        from quantbench.quant.rtn import rtn_quantize_linear

        return [rtn_quantize_linear(linear, scheme, input_scale=input_scale) for linear in linears]


class GPTQ(Algorithm):
    """GPTQ (:mod:`quantbench.quant.gptq`): each group solved on its Hessian; RTN where no token reached it."""

    name = "gptq"
    params = GPTQParams
    follows_rounding = False  # the solver settles its own codes
    minutes_per_b = 4.0

    def statistics(self, scheme: Scheme, *, smoothed: bool) -> Statistics:
        return Statistics(hessian=True)

    def quantize_group(
        self,
        group: Group,
        linears: Sequence[nn.Linear],
        scheme: Scheme,
        stack: BlockStack,
        input_scale: torch.Tensor | None,
    ) -> list[QuantLinear]:
        from quantbench.quant.gptq import gptq_quantize_linears

        if group.stats.tokens == 0:
            group.report.fallbacks.append("no calibration tokens: GPTQ replaced by round-to-nearest")
            return ALGORITHMS["rtn"].quantize_group(group, linears, scheme, stack, input_scale)
        modules, notes = gptq_quantize_linears(linears, group.stats.hessian, scheme, input_scale=input_scale)
        group.report.fallbacks.extend(n for n in notes if n not in group.report.fallbacks)
        return modules


class AWQ(Algorithm):
    """AWQ (:mod:`quantbench.quant.awq`): smoothing scales searched and folded per block, then round-to-nearest
    (after a clipping search with ``clip_search``)."""

    name = "awq"
    params = AWQParams
    minutes_per_b = 6.0  # its scale grid

    def statistics(self, scheme: Scheme, *, smoothed: bool) -> Statistics:
        quadratic = scheme.params.style == "quantbench" and smoothed  # losses from the Hessian
        return Statistics(hessian=quadratic or scheme.params.clip_search, abs_sum=smoothed)

    def smoothing(
        self, block: nn.Module, name: str, stack: BlockStack, scheme: Scheme, *, routed: bool
    ) -> Smoothing | None:
        from quantbench.quant.awq import Smoothing

        if routed:
            raise QuantbenchError(
                f"scheme {scheme.name}: calibration.experts 'routed' applies to static input scales and GPTQ; AWQ's "
                "smoothing of the experts reads their shared input on every token (drop the key for AWQ schemes)"
            )
        return Smoothing.for_block(block, name, stack, scheme)

    def quantize_group(
        self,
        group: Group,
        linears: Sequence[nn.Linear],
        scheme: Scheme,
        stack: BlockStack,
        input_scale: torch.Tensor | None,
    ) -> list[QuantLinear]:
        from quantbench.quant.awq import awq_quantize_linear

        clip = scheme.params.clip_search and group.stats.tokens > 0
        return [
            awq_quantize_linear(
                linear,
                scheme,
                hessian=group.stats.hessian if clip and n not in stack.clip_skip else None,
                input_scale=input_scale,
            )
            for n, linear in zip(group.names, linears)
        ]


ALGORITHMS: dict[str, Algorithm] = {algorithm.name: algorithm for algorithm in (RTN(), GPTQ(), AWQ())}


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm called ``name``, or an error listing them."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise QuantbenchError(f"unknown algorithm {name!r}; known algorithms: {', '.join(ALGORITHMS)}") from None

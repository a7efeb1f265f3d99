"""What vLLM runs for the compressed-tensors config a checkpoint carries, and the configs its MoE layers refuse.

quantbench's runtime simulates the served model, not the letter of the config. Read from vLLM's source
(0.10.0 and current main agree; paths under ``vllm/model_executor/layers/``):

- Dense linears, fp8 weights and *dynamic* fp8 inputs: ``CompressedTensorsConfig._is_fp8_w8a8`` accepts any
  dynamic input strategy, and ``CompressedTensorsW8A8Fp8.__init__`` (``compressed_tensors/schemes/
  compressed_tensors_w8a8_fp8.py``) gives ``Fp8LinearOp`` ``GroupShape.PER_TOKEN`` whenever the input scheme is
  not static: a config saying ``strategy: tensor, dynamic: true`` is served per token
  (:func:`served_input_args`).
- Fused-MoE experts, fp8 weights and inputs (``CompressedTensorsW8A8Fp8MoEMethod`` and its Cutlass twin in
  ``compressed_tensors/compressed_tensors_moe.py``): weights ``tensor`` with inputs ``tensor`` (static or
  dynamic), or weights ``channel`` with dynamic inputs ``token``; anything else is refused when the model
  loads (a ValueError in 0.10.0, an assertion on main). With dynamic ``tensor`` inputs the activations are
  quantized per tensor: one scale over every token of the forward batch for the gate/up GEMM
  (``moe_kernel_quantize_input`` in the prepare step), one over every routed (token, expert) row for
  down_proj (``ops.scaled_fp8_quant(c2, ...)`` in ``fused_moe/cutlass_moe.py``). Static inputs use the largest
  stored scale over the layer's experts, for gate/up and for down separately (``process_weights_after_loading``).
  :func:`moe_input_args` says when an expert linear is served so; :mod:`quantbench.model.experts` runs it.
- Int8 W8A8 experts (``CompressedTensorsW8A8Int8MoEMethod``): channel weights with dynamic token inputs only.
- Int4 weight-only experts (``CompressedTensorsWNA16(Marlin)MoEMethod``): vLLM 0.10.0 asserts symmetric
  weights; main serves zero points through Marlin. quantbench warns (:func:`check_fused_moe`).

Not simulated: vLLM requantizes per-tensor fp8 weights that it fuses (q/k/v, gate/up; an expert's gate and
up) to the largest of their scales (``requantize_with_max_scale``), and its kernels multiply by the
reciprocal of an fp8 scale where quantbench divides; both move a few weights or activations by one fp8 step.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import nn

from quantbench.quant.schemes import QuantArgs
from quantbench.util.errors import QuantbenchError

log = logging.getLogger(__name__)


def served_input_args(args: QuantArgs | None) -> QuantArgs | None:
    """How vLLM quantizes the inputs of a dense linear configured with ``args``: dynamic fp8 per token."""
    if args is not None and args.type == "float" and args.dynamic and args.strategy != "token":
        return replace(args, strategy="token")
    return args


def moe_input_args(linear: nn.Module) -> QuantArgs | None:
    """The input args of an expert linear whose inputs vLLM's fused MoE quantizes per tensor across the layer's
    experts (fp8, strategy ``tensor``), else None (per token, or not quantized: each expert on its own)."""
    args = getattr(linear, "input_args", None)
    if args is not None and args.type == "float" and args.strategy == "tensor":
        return args
    return None


def check_fused_moe(weights: QuantArgs, inputs: QuantArgs | None, where: str) -> None:
    """Refuse the expert quantization vLLM's fused-MoE methods refuse (module docstring); warn where it depends on
    the vLLM version."""
    if inputs is not None and weights.type == "float":
        if (weights.strategy, inputs.strategy) not in (("tensor", "tensor"), ("channel", "token")) or (
            weights.strategy == "channel" and not inputs.dynamic
        ):
            raise QuantbenchError(
                f"{where}: vLLM's fp8 fused-MoE layers take weights 'tensor' with inputs 'tensor' (static or dynamic), "
                f"or weights 'channel' with dynamic inputs 'token', not weights {weights.strategy!r} with "
                f"{'dynamic' if inputs.dynamic else 'static'} inputs {inputs.strategy!r}; vLLM would refuse this MoE "
                "checkpoint. Use input_activations strategy 'tensor' (as AngelSlim's FP8-Dynamic) or channel/token"
            )
    elif inputs is not None and (weights.strategy, inputs.strategy, inputs.dynamic) != ("channel", "token", True):
        raise QuantbenchError(
            f"{where}: vLLM's int8 fused-MoE layers take only per-channel weights with dynamic per-token inputs; "
            "vLLM would refuse this MoE checkpoint"
        )
    elif inputs is None and weights.type == "float":
        raise QuantbenchError(
            f"{where}: vLLM has no compressed-tensors fused-MoE method for fp8 weights without fp8 inputs"
        )
    elif inputs is None and not weights.symmetric:
        log.warning(
            "%s: asymmetric int4 experts: vLLM 0.10.0's compressed-tensors WNA16 MoE methods assert symmetric "
            "weights; recent vLLM serves zero points through Marlin",
            where,
        )

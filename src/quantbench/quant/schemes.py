"""Quantization schemes as data: parse and validate `config/schemes.yaml` into frozen dataclasses.

A scheme says how weights and input activations are quantized (mirroring compressed-tensors'
``QuantizationArgs`` field for field), which algorithm chooses the weights (rtn, gptq, awq:
:mod:`quantbench.quant.algorithms`) with its parameters (``params``, the YAML's section named after the
algorithm), how its calibration pass gathers statistics, how min-max parameters and codes are
rounded (``rounding``), the dtype the model is quantized and written in (``dtype``), and which module groups
it targets. Code asks a scheme questions (``scheme.weights.strategy``, ``scheme.needs_calibration``); it
never tests scheme names. A run config may override fields of the file's schemes (:func:`load_schemes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantbench.quant.algorithms import ALGORITHMS, get_algorithm
from quantbench.util.errors import QuantbenchError
from quantbench.util.specfile import build_spec, check_choice, read_section

QUANT_TYPES = ("int", "float")
STRATEGIES = ("tensor", "channel", "group", "token")
TARGET_GROUPS = ("language", "vision")
DTYPES = ("float16", "bfloat16", "float32")
ROUNDING_CHOICES = {
    "symmetric_scale": ("half_range", "qmax"),
    "asymmetric_range": ("with_zero", "minmax"),
    "divide_in": ("float32", "weight_dtype"),
}  # the first of each is compressed-tensors' convention


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor kind (weights or input activations) is quantized."""

    type: str
    num_bits: int
    strategy: str
    symmetric: bool = True
    group_size: int | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.type not in QUANT_TYPES:
            raise ValueError(f"type must be one of {QUANT_TYPES}, got {self.type!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.type == "float" and (self.num_bits != 8 or not self.symmetric):
            raise ValueError("float quantization supports only num_bits: 8 (fp8 e4m3), symmetric")
        if self.type == "int" and self.num_bits not in (4, 8):
            raise ValueError(f"int quantization supports num_bits 4 or 8, got {self.num_bits}")
        if (self.strategy == "group") != (self.group_size is not None):
            raise ValueError("group_size is required with strategy 'group' and only with it")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        """Smallest integer code: the signed range, for asymmetric args too (compressed-tensors' convention)."""
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.num_bits - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        """The compressed-tensors ``QuantizationArgs`` fields for this spec."""
        return asdict(self)


PROPAGATIONS = ("quantized", "full-precision")
EXPERT_STATISTICS = ("all-tokens", "routed")


@dataclass(frozen=True)
class CalibrationParams:
    """What a scheme's calibration pass feeds the statistics, quantbench's way first (docs/fidelity.md).

    ``propagation``: block i+1 calibrates on the outputs of the ``quantized`` blocks before it, or on the
    unquantized model's (``full-precision``: the published FP8-Static ran one BF16 forward with observers).
    ``experts`` (mixture-of-experts layers): every expert on every token (``all-tokens``), or each expert on
    the tokens the router sent it (``routed``), where an expert linear that saw no token takes the largest
    input absmax of the same linear of the layer's other experts (the published recipe's parent observer).
    """

    propagation: str = "quantized"
    experts: str = "all-tokens"

    def __post_init__(self) -> None:
        check_choice("propagation", self.propagation, PROPAGATIONS)
        check_choice("experts", self.experts, EXPERT_STATISTICS)


@dataclass(frozen=True)
class Rounding:
    """How min-max weight parameters and integer codes are computed (the stored tensors mean the same either way).

    - ``symmetric_scale``: ``half_range``, ``absmax / ((qmax - qmin) / 2)`` (compressed-tensors': 127.5 for
      int8, 7.5 for int4); ``qmax``, ``absmax / qmax`` (127 for int8: AngelSlim's INT8 weights).
    - ``asymmetric_range``: ``with_zero``, ``[min(w_min, 0), max(w_max, 0)]`` (compressed-tensors'); ``minmax``,
      ``[w_min, w_max]`` with the range floored at 1e-5 (AngelSlim's AWQ, ``pseudo_quantize_tensor``).
    - ``divide_in``: ``float32``, codes ``round(w / scale + zero_point)`` from the float32 quotient (compressed-
      tensors'); ``weight_dtype``, ``round(w / scale) + zero_point`` with the quotient rounded to the weight's
      dtype first (AngelSlim divides bf16/fp16 tensors: in bf16 that moves about 7% of int8 codes by one).
    """

    symmetric_scale: str = "half_range"
    asymmetric_range: str = "with_zero"
    divide_in: str = "float32"

    def __post_init__(self) -> None:
        for name, allowed in ROUNDING_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def is_default(self) -> bool:
        """True for compressed-tensors' conventions (every field at its default)."""
        return self == Rounding()


@dataclass(frozen=True)
class Scheme:
    """One named quantization scheme. ``weights is None`` means the unquantized (BF16) baseline."""

    name: str
    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    algorithm: str = "rtn"
    params: Any = None  # the algorithm's parameters (its ``params`` dataclass; None: its defaults, or none for rtn)
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    rounding: Rounding = field(default_factory=Rounding)
    dtype: str | None = None  # the dtype the model is quantized and written in (None: the model's own)
    targets: tuple[str, ...] = ("language",)

    def __post_init__(self) -> None:
        expected = get_algorithm(self.algorithm).params
        if self.params is None and expected is not None:
            object.__setattr__(self, "params", expected())
        elif not (self.params is None if expected is None else isinstance(self.params, expected)):
            raise ValueError(
                f"scheme {self.name}: algorithm {self.algorithm} takes {expected and expected.__name__}, got {self.params!r}"
            )

    @property
    def is_baseline(self) -> bool:
        """True when nothing is quantized."""
        return self.weights is None

    @property
    def needs_calibration(self) -> bool:
        """True when calibration data is required (data-aware algorithm or static activation scales)."""
        static_inputs = self.input_activations is not None and not self.input_activations.dynamic
        return not self.is_baseline and (get_algorithm(self.algorithm).needs_data or static_inputs)

    def to_dict(self) -> dict[str, Any]:
        """A plain-data form of the scheme, for provenance and Snakemake ``params:``."""
        out: dict[str, Any] = {"name": self.name, "algorithm": self.algorithm, "targets": list(self.targets)}
        out["weights"] = self.weights.to_dict() if self.weights else None
        out["input_activations"] = self.input_activations.to_dict() if self.input_activations else None
        if self.params is not None:
            out[self.algorithm] = asdict(self.params)
        if self.needs_calibration:
            out["calibration"] = asdict(self.calibration)
        if not self.rounding.is_default:
            out["rounding"] = asdict(self.rounding)
        if self.dtype is not None:
            out["dtype"] = self.dtype
        return out


def scheme_from_dict(raw: Mapping[str, Any]) -> Scheme:
    """Inverse of :meth:`Scheme.to_dict` (how a workflow job receives its scheme through ``params:``)."""
    raw = dict(raw)
    name = raw.pop("name")
    if raw.get("weights") is None:
        return Scheme(name=name)
    return parse_scheme(name, {key: value for key, value in raw.items() if value is not None})


def parse_scheme(name: str, raw: Mapping[str, Any] | None) -> Scheme:
    """Build a :class:`Scheme` from its YAML mapping, with errors that name the scheme and key."""
    raw = dict(raw or {})
    where = f"scheme {name!r}"
    sections = {key for key, algorithm in ALGORITHMS.items() if algorithm.params is not None}  # gptq:, awq:
    allowed = {"weights", "input_activations", "algorithm", "calibration", "rounding", "dtype", "targets"} | sections
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise QuantbenchError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    weights = build_spec(QuantArgs, raw["weights"], f"{where}.weights") if raw.get("weights") else None
    inputs = raw.get("input_activations")
    input_args = build_spec(QuantArgs, inputs, f"{where}.input_activations") if inputs else None
    algorithm = raw.get("algorithm", "rtn")
    if algorithm not in ALGORITHMS:
        raise QuantbenchError(f"{where}.algorithm: {algorithm!r} is not one of {tuple(ALGORITHMS)}")
    spec = ALGORITHMS[algorithm]
    stray = sorted(sections & set(raw) - {algorithm})
    if stray:
        raise QuantbenchError(
            f"{where}.{stray[0]}: parameters of algorithm {stray[0]}, but the scheme's algorithm is "
            f"{algorithm}; remove the key or set algorithm: {stray[0]}"
        )
    if weights is None and (input_args is not None or "algorithm" in raw):
        raise QuantbenchError(f"{where}: input_activations/algorithm given without weights")
    if input_args is not None and input_args.strategy == "group":
        raise QuantbenchError(f"{where}.input_activations: strategy 'group' is not supported")
    if weights is not None and weights.strategy == "token":
        raise QuantbenchError(f"{where}.weights: strategy 'token' applies to activations only")
    if input_args is not None and input_args.strategy == "token" and not input_args.dynamic:
        raise QuantbenchError(f"{where}.input_activations: per-token scales must be dynamic")
    if spec.integer_weights and (weights is None or weights.type != "int"):
        raise QuantbenchError(f"{where}: algorithm {algorithm} needs integer weights")
    rounding = build_spec(Rounding, raw.get("rounding", {}), f"{where}.rounding")
    if not rounding.is_default and (not spec.follows_rounding or weights is None or weights.type != "int"):
        rounders = " or ".join(key for key, a in ALGORITHMS.items() if a.follows_rounding)
        raise QuantbenchError(f"{where}.rounding: applies to integer weights rounded by {rounders}; remove it")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise QuantbenchError(f"{where}.dtype: {dtype!r} is not one of {DTYPES}")
    targets = tuple(raw.get("targets", ("language",)))
    bad = sorted(set(targets) - set(TARGET_GROUPS))
    if bad or not targets:
        raise QuantbenchError(f"{where}.targets: {bad or 'empty'}; allowed: {list(TARGET_GROUPS)}")
    scheme = Scheme(
        name=name,
        weights=weights,
        input_activations=input_args,
        algorithm=algorithm,
        params=build_spec(spec.params, raw.get(algorithm, {}), f"{where}.{algorithm}") if spec.params else None,
        calibration=build_spec(CalibrationParams, raw.get("calibration", {}), f"{where}.calibration"),
        rounding=rounding,
        dtype=dtype,
        targets=targets,
    )
    if "calibration" in raw and not scheme.needs_calibration:
        raise QuantbenchError(f"{where}.calibration: the scheme uses no calibration data; drop the key")
    return scheme


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replacing its own, mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
        )
    return out


def load_schemes(path: str | Path, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Scheme]:
    """Read every scheme of a schemes YAML file (top-level key ``schemes``), in file order.

    ``overrides`` (a run config's ``scheme_overrides``) replace fields of named schemes, nested mappings
    merged key by key, e.g. ``{"INT4-GPTQ": {"gptq": {"dead_columns": "zero"}}}``.
    """
    raw = dict(read_section(path, "schemes"))
    for name, override in (overrides or {}).items():
        if name not in raw:
            raise QuantbenchError(f"scheme_overrides: unknown scheme {name!r}; known schemes: {', '.join(raw)}")
        if not isinstance(override, Mapping):
            raise QuantbenchError(f"scheme_overrides.{name}: expected a mapping of scheme fields")
        raw[name] = _merged(raw[name] or {}, override)
    return {name: parse_scheme(name, spec) for name, spec in raw.items()}


def get_scheme(schemes: Mapping[str, Scheme], name: str) -> Scheme:
    """Look a scheme up by name, or fail with the list of known names."""
    try:
        return schemes[name]
    except KeyError:
        raise QuantbenchError(f"unknown scheme {name!r}; known schemes: {', '.join(schemes)}") from None

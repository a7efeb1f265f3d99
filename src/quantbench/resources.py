"""What one workflow job asks the scheduler for, computed from the model's size: GPUs, CPU threads, host
memory and wall time.

These are sizing rules, not measurements; each is a short formula of the parameter count (``params_b``,
billions, all experts of a MoE counted: every expert must be resident) and the bits per weight of the
checkpoint the job reads:

* ``calibrate`` tokenizes text on the CPU: no GPU, one thread, 4 GiB, 30 minutes, whatever the model's size.
* ``quantize`` runs the sequential pipeline: the BF16 model stays in host memory and one decoder layer at
  a time goes to one GPU, so it takes one whole GPU and host memory of 1.25 x the BF16 weights plus room
  for the cached calibration activations (2 GiB + 1 GiB per billion parameters, at most 32 GiB). Wall
  time is 10 minutes plus, per billion parameters, 1 (RTN), 4 (GPTQ) or 6 (AWQ, its scale grid) minutes;
  four times that on a CPU. Eight threads: the export packs and hashes on as many threads as it gets,
  and on a CPU they run the layers.
* ``evaluate`` loads the whole checkpoint on its GPUs (vLLM tensor parallelism): the weights
  (``params_b x bits / 8`` GB) plus 10% for the KV cache must fit in the GPUs' usable memory (90% of each
  card, less 6 GB of CUDA context and activations per GPU). The GPU count is the smallest power of two
  that fits (tensor-parallel sizes must divide the attention heads), at most one node's GPUs: a 235B MoE
  in BF16 gets 8 x 80 GB, in FP8 4. Host memory is 16 GiB plus half the checkpoint; wall time 30 minutes
  plus 2 per billion parameters; four threads per GPU (vLLM's worker per GPU, tokenization, lm-eval). On a
  CPU (the demo) the model runs in float32: no GPU, 1.5 x the float32 weights plus 1 GiB of host memory,
  30 minutes plus an hour per billion parameters, eight threads.

The memory of one GPU (``Hardware.gpu_mem_gb``) decides how many GPUs an evaluation gets; the cards
themselves are chosen by the profile (``gpu_model``: see profiles/README.md), since the scheduler takes a
GPU count and type, not a memory size.

A job that hits its time limit is retried (the profile's ``retries``) with :func:`runtime_for_attempt`:
attempt n gets n times the wall time (a quantization resumes from its last saved layer).

A job on a CPU (``device: cpu`` in the config) asks for no GPU, so the embedded demo runs on any machine
and cluster. Memory values are MiB and wall time is minutes: Snakemake's ``mem_mb`` and ``runtime``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from quantbench.errors import QuantbenchError
from quantbench.schemes import Scheme

STEPS = ("calibrate", "quantize", "evaluate")
QUANTIZE_MIN_PER_B = {"rtn": 1.0, "gptq": 4.0, "awq": 6.0}
CPU_SLOWDOWN = 4.0
GPU_USABLE_FRACTION = 0.9
GPU_OVERHEAD_GB = 6.0
KV_CACHE_FRACTION = 0.1
BASELINE_BITS = 16
QUANTIZE_THREADS = 8
THREADS_PER_EVAL_GPU = 4
CPU_EVAL_THREADS = 8


@dataclass(frozen=True)
class Hardware:
    """The GPUs jobs run on: memory of one card (GB) and how many cards one node has."""

    gpu_mem_gb: float = 80.0
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if self.gpu_mem_gb <= GPU_OVERHEAD_GB / GPU_USABLE_FRACTION or self.gpus_per_node < 1:
            raise QuantbenchError(
                f"hardware: gpu_mem_gb must exceed {GPU_OVERHEAD_GB / GPU_USABLE_FRACTION:.1f} and gpus_per_node "
                f"must be >= 1, got {self.gpu_mem_gb} and {self.gpus_per_node}"
            )


@dataclass(frozen=True)
class JobResources:
    """One job's request: GPUs, CPU threads, host memory (MiB), wall time (minutes, of the first attempt)."""

    gpu: int
    threads: int
    mem_mb: int
    runtime: int

    def to_dict(self) -> dict[str, int]:
        """Plain form, keyed by the Snakemake resource names."""
        return asdict(self)


def _mib(gigabytes: float) -> int:
    return math.ceil(gigabytes * 1024)


def runtime_for_attempt(minutes: int, attempt: int) -> int:
    """Wall time of attempt ``attempt`` (1, 2, ...) of a job whose first attempt gets ``minutes``."""
    return minutes * attempt


def checkpoint_gb(params_b: float, bits: int) -> float:
    """Size of the weights in GB at ``bits`` per weight."""
    return params_b * bits / 8


def weight_bits(scheme: Scheme | None) -> int:
    """Bits per stored weight of a scheme's checkpoint (16 for the BF16 baseline)."""
    return BASELINE_BITS if scheme is None or scheme.weights is None else scheme.weights.num_bits


def on_gpu(device: str) -> bool:
    """Whether a configured device (``auto``, ``cpu``, ``cuda``, ``cuda:N``) means a GPU job; ``auto`` does."""
    return device != "cpu"


def eval_gpus(params_b: float, bits: int, hardware: Hardware = Hardware()) -> int:
    """GPUs an evaluation of a ``params_b`` model stored at ``bits`` per weight needs (a power of two)."""
    need = checkpoint_gb(params_b, bits) * (1 + KV_CACHE_FRACTION)
    per_gpu = hardware.gpu_mem_gb * GPU_USABLE_FRACTION - GPU_OVERHEAD_GB
    gpus = 1 << max(0, math.ceil(math.log2(max(need / per_gpu, 1.0))))
    if gpus > hardware.gpus_per_node:
        raise QuantbenchError(
            f"a {params_b}B-parameter checkpoint at {bits} bits needs {gpus} GPUs of {hardware.gpu_mem_gb} GB, "
            f"more than one node's {hardware.gpus_per_node}; raise hardware.gpus_per_node or hardware.gpu_mem_gb "
            "if your nodes have more"
        )
    return gpus


def job_resources(
    step: str,
    params_b: float | None,
    *,
    scheme: Scheme | None = None,
    device: str = "auto",
    hardware: Hardware = Hardware(),
    model: str = "the model",
) -> JobResources:
    """The resources of one ``step`` job (see the module docstring for the rules).

    ``scheme``: the scheme quantized (``quantize``) or evaluated (``evaluate``; ``None`` or the baseline:
    BF16 weights). ``device``: where the step runs, as configured. ``model`` names the model in errors.
    """
    if step not in STEPS:
        raise QuantbenchError(f"no resource rule for step {step!r}; steps: {', '.join(STEPS)}")
    if params_b is None or params_b <= 0:
        raise QuantbenchError(
            f"{model}: params_b is {params_b!r}; set models.{model}.params_b to its size in billions of "
            "parameters (all experts of a MoE), which sizes its jobs' GPUs, memory and wall time"
        )
    gpu = on_gpu(device)
    if step == "calibrate":
        return JobResources(gpu=0, threads=1, mem_mb=_mib(4), runtime=30)
    if step == "quantize":
        algorithm = "rtn" if scheme is None else scheme.algorithm
        if algorithm not in QUANTIZE_MIN_PER_B:
            raise QuantbenchError(f"no quantize time rule for algorithm {algorithm!r}; known: {sorted(QUANTIZE_MIN_PER_B)}")
        minutes = (10 + QUANTIZE_MIN_PER_B[algorithm] * params_b) * (1 if gpu else CPU_SLOWDOWN)
        activations = min(32.0, 2 + params_b)
        return JobResources(
            gpu=int(gpu),
            threads=QUANTIZE_THREADS,
            mem_mb=_mib(1.25 * checkpoint_gb(params_b, BASELINE_BITS) + activations),
            runtime=math.ceil(minutes),
        )
    bits = weight_bits(scheme)
    if not gpu:
        return JobResources(
            gpu=0,
            threads=CPU_EVAL_THREADS,
            mem_mb=_mib(1.5 * checkpoint_gb(params_b, 32) + 1),
            runtime=math.ceil(30 + 60 * params_b),
        )
    gpus = eval_gpus(params_b, bits, hardware)
    return JobResources(
        gpu=gpus,
        threads=THREADS_PER_EVAL_GPU * gpus,
        mem_mb=_mib(16 + 0.5 * checkpoint_gb(params_b, bits)),
        runtime=math.ceil(30 + 2 * params_b),
    )

"""What one workflow job asks the scheduler for, computed from the model's size: GPUs, CPU threads, host
memory and wall time.

These are sizing rules, not measurements; each is a short formula of the parameter count (``params_b``,
billions, all experts of a MoE counted: every expert must be resident) and the bits per weight of the
checkpoint the job reads:

* ``calibrate`` tokenizes text on the CPU: no GPU, one thread, 4 GiB, 30 minutes, whatever the model's size.
* ``quantize`` runs the sequential pipeline: the BF16 model stays in host memory and one decoder layer at
  a time goes to one GPU, so it takes one whole GPU and host memory of 1.25 x the BF16 weights plus room
  for the cached calibration activations (2 GiB + 1 GiB per billion parameters, at most 32 GiB). Wall
  time is 10 minutes plus, per billion parameters, the algorithm's minutes (``minutes_per_b`` of
  :mod:`quantbench.quant.algorithms`: 1 for RTN, 4 for GPTQ, 6 for AWQ and its scale grid);
  four times that on a CPU. Eight threads: the export packs and hashes on as many threads as it gets,
  and on a CPU they run the layers.
* ``evaluate`` loads the whole checkpoint on its GPUs (vLLM tensor parallelism): the weights
  (``params_b x bits / 8`` GB) plus 10% for the KV cache must fit in the GPUs' usable memory (90% of each
  card, less 6 GB of CUDA context and activations per GPU). The GPU count is the smallest power of two
  that fits (tensor-parallel sizes must divide the attention heads), at most one node's GPUs: a 235B MoE
  in BF16 gets 8 x 80 GB, in FP8 4. Host memory is 16 GiB plus half the checkpoint. Wall time comes from
  the benchmark's workload (``workloads:`` of the benchmarks file: requests, prompt tokens, new tokens) at
  the evaluation rates measured on one H200 (:data:`HF_RATES`, benchmarks/RESULTS.md): prompt tokens at the
  full-logit forward rate and decode steps at the batched decode rate of the benchmark's decoding path
  (:func:`eval_rates`: ``generate`` for the vision-language scorers and sampled generations), both scaled from the measured model
  to ``params_b`` (per GPU for vLLM's tensor parallelism), times :data:`EVAL_MARGIN`, plus the checkpoint's
  read at 1 GB/s and 10 minutes of start-up. vLLM is sized with the hf backend's rates, an upper bound (it
  batches wider and runs low-bit kernels). A benchmark without a workload gets 30 minutes plus 2 per
  billion parameters. On a CPU (the demo) the model runs in float32: no GPU, 1.5 x the float32 weights plus
  1 GiB of host memory, 30 minutes plus an hour per billion parameters, eight threads. Four threads per GPU
  (vLLM's worker per GPU, tokenization, lm-eval).

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
from pathlib import Path

from quantbench.evaluate.benchmarks import BenchmarkSpec
from quantbench.quant.algorithms import get_algorithm
from quantbench.quant.schemes import Scheme
from quantbench.util.errors import QuantbenchError
from quantbench.util.specfile import build_spec, read_section

STEPS = ("calibrate", "quantize", "evaluate")
CPU_SLOWDOWN = 4.0
GPU_USABLE_FRACTION = 0.9
GPU_OVERHEAD_GB = 6.0
KV_CACHE_FRACTION = 0.1
BASELINE_BITS = 16
EVAL_MARGIN = 1.5  # measured compute time x this: other cards, other tokenizers, lm-eval's own work
EVAL_STARTUP_MIN = 10.0
CHECKPOINT_READ_GB_PER_S = 1.0


@dataclass(frozen=True)
class EvalWorkload:
    """What scoring a benchmark once takes: model calls (``requests``; multiple-choice options sharing a
    context are one), mean prompt tokens per call, new tokens per generation (the cap: a model that never
    stops), and the batch generations run in (``None``: the backend's)."""

    requests: int
    prompt_tokens: int
    new_tokens: int = 0
    batch: int | None = None

    def __post_init__(self) -> None:
        if (
            self.requests < 1
            or self.prompt_tokens < 1
            or self.new_tokens < 0
            or (self.batch is not None and self.batch < 1)
        ):
            raise ValueError("requests and prompt_tokens must be >= 1, new_tokens >= 0, batch >= 1")


@dataclass(frozen=True)
class EvalRates:
    """Measured evaluation rates of a ``params_b`` model on one GPU: prompt tokens/s through full-logit
    forwards, and decode steps/s with ``batch`` rows."""

    params_b: float
    prompt_tokens_per_s: float
    decode_steps_per_s: float
    batch: int


# The hf backend (simulated-quantization runtime, GreedyDecoder) on one H200, Qwen3-8B architecture
# (benchmarks/RESULTS.md, run 19, bench_eval.py): MMLU scored through lm-eval at 13-15k prompt tokens/s,
# greedy decode at 1027 tokens/s with 8 rows (128 steps/s).
HF_RATES = EvalRates(params_b=8.19, prompt_tokens_per_s=14000.0, decode_steps_per_s=128.0, batch=8)
# transformers' generate on the same card (run 18: 213 tokens/s with 8 rows): the vision-language scorers'
# path (quantbench's local scorer and lmms-eval call generate).
HF_GENERATE_RATES = EvalRates(params_b=8.19, prompt_tokens_per_s=14000.0, decode_steps_per_s=26.6, batch=8)


def eval_rates(spec: BenchmarkSpec | None) -> EvalRates:
    """The measured rates of the path that evaluates ``spec`` on the hf backend: vision-language benchmarks
    and sampled generations decode through ``generate``, lm-eval's greedy ones through
    :class:`quantbench.evaluate.generation.GreedyDecoder`."""
    if spec is None:
        return HF_RATES
    sampled = spec.lm_eval is not None and bool(spec.lm_eval.generation.get("do_sample"))
    return HF_GENERATE_RATES if spec.lmms_eval is not None or sampled else HF_RATES


def load_workloads(path: str | Path) -> dict[str, EvalWorkload]:
    """The ``workloads:`` section of a benchmarks file, by benchmark name (empty when the file has none)."""
    try:
        raw = read_section(path, "workloads")
    except QuantbenchError:
        return {}
    return {name: build_spec(EvalWorkload, value, f"{path}: workloads.{name}") for name, value in raw.items()}


def eval_seconds(
    params_b: float, workload: EvalWorkload, rates: EvalRates = HF_RATES, batch: int | None = None
) -> float:
    """Compute seconds of one evaluation of a ``params_b`` model (on one GPU's share) at ``rates``: every
    prompt token at the forward rate, every decode step of every batch at the step rate, both scaled by size."""
    scale = params_b / rates.params_b
    prompt_s = workload.requests * workload.prompt_tokens / rates.prompt_tokens_per_s * scale
    rows = workload.batch or batch or rates.batch
    decode_s = math.ceil(workload.requests / rows) * workload.new_tokens / rates.decode_steps_per_s * scale
    return prompt_s + decode_s


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
    workload: EvalWorkload | None = None,
    rates: EvalRates = HF_RATES,
    backend: str = "hf",
    batch: int | None = None,
) -> JobResources:
    """The resources of one ``step`` job (see the module docstring for the rules).

    ``scheme``: the scheme quantized (``quantize``) or evaluated (``evaluate``; ``None`` or the baseline:
    BF16 weights). ``device``: where the step runs, as configured. ``model`` names the model in errors.
    ``workload``, ``rates``, ``backend``, ``batch``: the evaluated benchmark's workload, the measured rates of
    its path (:func:`eval_rates`), the evaluation backend and its batch size (``evaluate`` on GPUs).
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
        per_b = get_algorithm("rtn" if scheme is None else scheme.algorithm).minutes_per_b
        minutes = (10 + per_b * params_b) * (1 if gpu else CPU_SLOWDOWN)
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
    if workload is None:
        minutes = 30 + 2 * params_b
    else:
        share = params_b / gpus if backend == "vllm" else params_b
        read = checkpoint_gb(params_b, bits) / CHECKPOINT_READ_GB_PER_S
        minutes = EVAL_STARTUP_MIN + (read + EVAL_MARGIN * eval_seconds(share, workload, rates, batch)) / 60
    return JobResources(
        gpu=gpus,
        threads=THREADS_PER_EVAL_GPU * gpus,
        mem_mb=_mib(16 + 0.5 * checkpoint_gb(params_b, bits)),
        runtime=math.ceil(minutes),
    )

"""Job resources from a model's size: GPUs, CPU threads, host memory and wall time per workflow step."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantbench.errors import QuantbenchError
from quantbench.resources import Hardware, JobResources, eval_gpus, job_resources, runtime_for_attempt
from quantbench.schemes import load_schemes

SCHEMES = load_schemes(Path(__file__).resolve().parents[1] / "config" / "schemes.yaml")


@pytest.mark.parametrize(
    ("params_b", "scheme", "expected"),
    [
        # 470 GB of BF16 weights + 10% KV cache = 517 GB over 66 usable GB per 80 GB card: 7.8 -> 8 GPUs,
        # 4 threads each; host 16 + 235 GB; 30 + 2 x 235 minutes.
        (235, "BF16", JobResources(gpu=8, threads=32, mem_mb=257024, runtime=500)),
        # FP8: 258.5 GB -> 3.9 -> 4 GPUs; host 16 + 117.5 GB.
        (235, "FP8-Static", JobResources(gpu=4, threads=16, mem_mb=136704, runtime=500)),
        # 65.6 GB x 1.1 = 72.2 GB > 66: two GPUs.
        (32.8, "BF16", JobResources(gpu=2, threads=8, mem_mb=49972, runtime=96)),
        # INT4: 16.4 GB x 1.1 = 18.04 GB on one GPU.
        (32.8, "INT4-GPTQ", JobResources(gpu=1, threads=4, mem_mb=24781, runtime=96)),
        (0.6, "INT8-Dynamic", JobResources(gpu=1, threads=4, mem_mb=16692, runtime=32)),
    ],
)
def test_evaluation_on_gpus(params_b, scheme, expected):
    assert job_resources("evaluate", params_b, scheme=SCHEMES[scheme], device="cuda") == expected


def test_gpu_count_is_a_power_of_two_that_grows_with_size():
    sizes = [0.5, 4, 8.2, 14.8, 32.8, 40, 73.4, 80, 150, 235]
    counts = [eval_gpus(size, 16) for size in sizes]
    assert counts == [1, 1, 1, 1, 2, 2, 4, 4, 8, 8]
    assert [eval_gpus(size, 4) for size in sizes] == [1, 1, 1, 1, 1, 1, 1, 1, 2, 2]


def test_smaller_cards_need_more_gpus_and_too_few_per_node_is_an_error():
    assert eval_gpus(32.8, 16, Hardware(gpu_mem_gb=40)) == 4  # 72.2 GB over 30 usable GB each
    with pytest.raises(QuantbenchError, match=r"needs 32 GPUs of 40 GB, more than one node's 8; raise hardware"):
        eval_gpus(235, 16, Hardware(gpu_mem_gb=40))
    assert eval_gpus(235, 16, Hardware(gpu_mem_gb=40, gpus_per_node=32)) == 32


def test_quantization_holds_the_bf16_model_in_host_memory_and_uses_one_gpu():
    # 1.25 x 470 GB + 32 GB of activations; 10 + 1 x 235 minutes for RTN
    assert job_resources("quantize", 235, scheme=SCHEMES["FP8-Static"], device="cuda") == JobResources(
        gpu=1, threads=8, mem_mb=634368, runtime=245
    )
    # AWQ's grid search: 10 + 6 x 8.2 minutes; 1.25 x 16.4 GB + (2 + 8.2) GB
    assert job_resources("quantize", 8.2, scheme=SCHEMES["INT4-AWQ"], device="auto") == JobResources(
        gpu=1, threads=8, mem_mb=31437, runtime=60
    )
    gptq = job_resources("quantize", 8.2, scheme=SCHEMES["INT4-GPTQ"], device="cuda:0")
    assert gptq.runtime == 43 and gptq.gpu == 1


def test_cpu_jobs_ask_for_no_gpu():
    # the embedded demo: 12.6M parameters, float32 on the CPU
    assert job_resources("evaluate", 0.0126, scheme=SCHEMES["BF16"], device="cpu") == JobResources(
        gpu=0, threads=8, mem_mb=1102, runtime=31
    )
    assert job_resources("quantize", 0.0126, scheme=SCHEMES["INT4-AWQ"], device="cpu") == JobResources(
        gpu=0, threads=8, mem_mb=2094, runtime=41
    )
    for size in (0.6, 235):
        assert job_resources("calibrate", size, device="cuda") == JobResources(
            gpu=0, threads=1, mem_mb=4096, runtime=30
        )


def test_a_retried_job_gets_more_time():
    first = job_resources("quantize", 8.2, scheme=SCHEMES["INT4-GPTQ"], device="cuda").runtime
    assert [runtime_for_attempt(first, attempt) for attempt in (1, 2, 3)] == [43, 86, 129]


def test_errors_name_the_model_and_the_fix():
    with pytest.raises(QuantbenchError, match=r"Qwen3-8B: params_b is None; set models\.Qwen3-8B\.params_b"):
        job_resources("evaluate", None, scheme=SCHEMES["BF16"], model="Qwen3-8B")
    with pytest.raises(QuantbenchError, match=r"no resource rule for step 'tabulate'"):
        job_resources("tabulate", 1.0)
    with pytest.raises(QuantbenchError, match=r"gpu_mem_gb must exceed"):
        Hardware(gpu_mem_gb=4)

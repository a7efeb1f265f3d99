"""Job resources from a model's size: GPUs, CPU threads, host memory and wall time per workflow step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.quant.schemes import load_schemes
from quantbench.run.sizing import (
    HF_GENERATE_RATES,
    HF_RATES,
    EvalRates,
    EvalWorkload,
    Hardware,
    JobResources,
    eval_gpus,
    eval_rates,
    eval_seconds,
    job_resources,
    load_workloads,
    runtime_for_attempt,
)
from quantbench.util.errors import QuantbenchError

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


BENCHMARKS_FILE = Path(__file__).resolve().parents[1] / "config" / "benchmarks.yaml"


def test_evaluation_time_follows_the_benchmark_workload_at_the_measured_rates():
    workloads = load_workloads(BENCHMARKS_FILE)
    gsm8k = workloads["GSM8K"]
    # prompts at the forward rate, ceil(1319 / 8) batches of 256 decode steps at the step rate (8.19B measured)
    seconds = (
        gsm8k.requests * gsm8k.prompt_tokens / HF_RATES.prompt_tokens_per_s + 165 * 256 / HF_RATES.decode_steps_per_s
    )
    assert eval_seconds(8.19, gsm8k) == pytest.approx(seconds)
    assert eval_seconds(16.38, gsm8k) == pytest.approx(2 * seconds)  # both rates scale with the weights
    # 10 minutes of start-up, the 16.4 GB checkpoint read at 1 GB/s, 1.5 x the compute
    job = job_resources("evaluate", 8.19, scheme=SCHEMES["BF16"], device="cuda", workload=gsm8k)
    assert job.runtime == math.ceil(10 + (16.38 + 1.5 * seconds) / 60)
    # an INT4 checkpoint reads a quarter of the bytes; the hf runtime computes in bf16 all the same
    int4 = job_resources("evaluate", 8.19, scheme=SCHEMES["INT4-GPTQ"], device="cuda", workload=gsm8k)
    assert int4.runtime == math.ceil(10 + (4.095 + 1.5 * seconds) / 60)


def test_generation_batch_and_tensor_parallelism_shorten_the_estimate():
    workload = EvalWorkload(requests=64, prompt_tokens=1000, new_tokens=100)
    rates = EvalRates(params_b=1.0, prompt_tokens_per_s=1000.0, decode_steps_per_s=10.0, batch=8)
    assert eval_seconds(1.0, workload, rates) == pytest.approx(64 + 8 * 10)
    assert eval_seconds(1.0, workload, rates, batch=32) == pytest.approx(64 + 2 * 10)
    one_at_a_time = EvalWorkload(requests=64, prompt_tokens=1000, new_tokens=100, batch=1)
    assert eval_seconds(1.0, one_at_a_time, rates, batch=32) == pytest.approx(64 + 64 * 10)
    # vLLM spreads a 235B model over 8 GPUs: each holds an eighth, so the estimate is that of 29.4B
    mmlu = load_workloads(BENCHMARKS_FILE)["MMLU"]
    vllm = job_resources("evaluate", 235, scheme=SCHEMES["BF16"], device="cuda", workload=mmlu, backend="vllm")
    assert vllm.gpu == 8
    assert vllm.runtime == math.ceil(10 + (470 + 1.5 * eval_seconds(235 / 8, mmlu)) / 60)


def test_every_seed_benchmark_has_a_workload_and_bad_entries_are_errors(tmp_path: Path):
    workloads = load_workloads(BENCHMARKS_FILE)
    assert {"CEVAL", "MMLU", "GSM8K", "HUMANEVAL", "MMMU_VAL", "DocVQA_VAL", "ChartQA_TEST"} <= set(workloads)
    bad = tmp_path / "benchmarks.yaml"
    bad.write_text("workloads:\n  MMLU: {requests: 0, prompt_tokens: 10}\n", encoding="utf-8")
    with pytest.raises(QuantbenchError, match=r"workloads\.MMLU: requests and prompt_tokens must be >= 1"):
        load_workloads(bad)
    assert load_workloads(tmp_path / "absent.yaml") == {}


def test_vision_language_benchmarks_are_sized_at_the_rate_of_generate():
    """Their scorers decode through transformers' generate, lm-eval's benchmarks through GreedyDecoder."""
    specs = load_benchmarks(BENCHMARKS_FILE)
    assert eval_rates(specs["DocVQA_VAL"]) is HF_GENERATE_RATES
    assert eval_rates(specs["GSM8K"]) is HF_RATES and eval_rates(None) is HF_RATES
    docvqa = load_workloads(BENCHMARKS_FILE)["DocVQA_VAL"]
    slow = job_resources(
        "evaluate", 7.0, scheme=SCHEMES["BF16"], device="cuda", workload=docvqa, rates=HF_GENERATE_RATES
    )
    fast = job_resources("evaluate", 7.0, scheme=SCHEMES["BF16"], device="cuda", workload=docvqa)
    assert slow.runtime > fast.runtime

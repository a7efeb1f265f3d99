"""vLLM's CPU build against quantbench's runtime: every export it loads, the vllm evaluation backend through the
workflow, and lmms-eval's vllm model as it really is.

The vLLM side runs in the vLLM environment (``make vllm-env``: ``.venv-vllm``, vLLM's own pins) as
subprocesses: one process loads every checkpoint in turn (``tests/vllm_worker.py``) and scores the same
held-out tokens teacher-forced; quantbench's runtime scores them here. Bounds come from the BF16 model's own
vLLM-vs-transformers difference in the same run:

* INT4-GPTQ/AWQ (vLLM: bf16 weights dequantized from the same codes) differ from quantbench no more than BF16
  does, within three standard errors of the per-token difference.
* INT8-Dynamic's int8 codes of a token change when its inputs move by one rounding step, and such a code
  flip changes every later log-prob; so the end-to-end bound is BF16's difference times that amplification,
  measured on quantbench itself (float32 against bfloat16 compute, INT8 against BF16). What must match
  exactly is tested layer by layer on vLLM's own inputs: the scales bit for bit, the codes except at exact
  half-step ties, which vLLM's CPU kernel rounds its own way (quantbench follows the CUDA kernel), and the
  outputs bit for bit given vLLM's codes.
* vLLM's CPU build cannot load FP8 checkpoints (no fp8 quantization ops), int8 MoE experts (no int8 MoE
  kernel) or Qwen2.5-VL (its processor needs torchvision, whose PyPI wheels are CUDA builds): the tests
  assert those errors, so a release that lifts a limit fails here and the README is updated.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from quantbench.checkpoint.load import load_model
from quantbench.cli import main
from quantbench.evaluate.backend import Backend
from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.evaluate.runner import evaluate_benchmark
from quantbench.quant import qdq
from vlm_fixtures import save_tiny_vlm

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VLLM_PYTHON = Path(os.environ.get("QUANTBENCH_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
DENSE = REPO / "resources" / "models" / "tinyqwen3-dense"
TEXTS = REPO / "resources" / "calib" / "gutenberg_heldout_demo.jsonl"
PROMPTS, PROMPT_TOKENS = 4, 256
LM_EVAL_BENCHMARKS = ["CEVAL", "MMLU", "GSM8K", "HUMANEVAL"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(), reason=f"no vLLM environment at {VLLM_PYTHON}; `make vllm-env` creates it"
    ),
]


def vllm_env(**extra: str) -> dict[str, str]:
    """The environment of a vLLM subprocess: 1 GiB of KV cache (the machine is shared), plus ``extra``."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **extra}


def run_vllm(args: list[str], env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(VLLM_PYTHON), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def runtime_logprobs(model_dir: Path, prompts: list[list[int]], dtype: torch.dtype) -> list[list[float]]:
    """Teacher-forced log-prob of every prompt token after the first, through quantbench's runtime."""
    model, _ = load_model(model_dir, dtype=dtype)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            logits = model(torch.tensor([prompt])).logits[0].float()
            out.append(torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist())
    return out


def abs_diff(a: list[list[float]], b: list[list[float]]) -> torch.Tensor:
    """Per-token |a - b| over all prompts, flattened."""
    return (torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().flatten()


def paired_bound(reference: torch.Tensor, factor: float, other: torch.Tensor) -> float:
    """``factor * mean(reference)`` plus three standard errors of the per-token ``other - factor * reference``."""
    paired = other - factor * reference
    return float(factor * reference.mean() + 3 * paired.std() / math.sqrt(len(paired)))


def quantize(model_dir: Path, scheme: str, out: Path, calib: Path) -> Path:
    assert (
        main(
            [
                "quantize",
                "--model",
                str(model_dir),
                "--scheme",
                scheme,
                "--out",
                str(out),
                "--calib",
                str(calib),
                "--num-samples",
                "16",
                "--max-seq-len",
                "256",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> dict:
    """Every checkpoint through vLLM (one worker process) and through quantbench's runtime, on the same tokens.

    Calibration takes the first 16 texts of the demo's held-out Gutenberg file, evaluation 4 x 256 tokens of
    4 others. Loads vLLM should manage come first; the expected failures last.
    """
    root = tmp_path_factory.mktemp("vllm")
    texts = [json.loads(line)["text"] for line in TEXTS.read_text(encoding="utf-8").splitlines()]
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:16]), encoding="utf-8")
    dirs = {"BF16": DENSE}
    for scheme in ("INT4-GPTQ", "INT4-AWQ", "INT8-Dynamic", "FP8-Dynamic", "FP8-Static"):
        dirs[scheme] = quantize(DENSE, scheme, root / scheme, calib)
    moe = SHARED / "models" / "tinyqwen3-moe"
    if moe.is_dir():
        dirs["MoE-BF16"] = moe
        dirs["MoE-INT8-Dynamic"] = quantize(moe, "INT8-Dynamic", root / "MoE-INT8-Dynamic", calib)
    dirs["VL-BF16"] = save_tiny_vlm(root / "VL-BF16")

    from transformers import AutoTokenizer

    prompts = {}
    for name, path in dirs.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompts[name] = [tokenizer(t)["input_ids"][:PROMPT_TOKENS] for t in texts[48::4][:PROMPTS]]
        assert all(len(p) == PROMPT_TOKENS for p in prompts[name])
    order = [
        "BF16",
        "INT4-GPTQ",
        "INT4-AWQ",
        "INT8-Dynamic",
        "MoE-BF16",
        "MoE-INT8-Dynamic",
        "VL-BF16",
        "FP8-Dynamic",
        "FP8-Static",
    ]
    job = {
        "dtype": "bfloat16",
        "models": [
            {
                "name": n,
                "path": str(dirs[n]),
                "prompts": prompts[n],
                **({"dump": str(root / "int8-layers.pt")} if n == "INT8-Dynamic" else {}),
            }
            for n in order
            if n in dirs
        ],
    }
    (root / "job.json").write_text(json.dumps(job), encoding="utf-8")
    proc = run_vllm(
        [str(REPO / "tests" / "vllm_worker.py"), str(root / "job.json"), str(root / "out.json")],
        vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"),
    )
    vllm = json.loads((root / "out.json").read_text(encoding="utf-8"))
    platform = vllm.pop("platform")
    runtime = {n: runtime_logprobs(dirs[n], prompts[n], torch.bfloat16) for n in vllm if "logprobs" in vllm[n]}
    return {
        "dirs": dirs,
        "prompts": prompts,
        "vllm": vllm,
        "runtime": runtime,
        "log": proc.stdout + proc.stderr,
        "dump": root / "int8-layers.pt",
        "cpu_build": platform == "cpu",
    }


def cpu_build_only(engines: dict) -> None:
    if not engines["cpu_build"]:
        pytest.skip("a limit of vLLM's CPU build; the vLLM environment holds another build")


def _difference(engines: dict, name: str) -> torch.Tensor:
    result = engines["vllm"][name]
    assert "logprobs" in result, f"vLLM did not load {name}: {result.get('error')}"
    return abs_diff(result["logprobs"], engines["runtime"][name])


def significantly_below(small: torch.Tensor, large: torch.Tensor) -> bool:
    """Whether the per-token mean of ``small`` is below ``large``'s by more than three standard errors (paired)."""
    paired = large - small
    return bool(paired.mean() > 3 * paired.std() / math.sqrt(len(paired)))


def test_bf16_agrees_closer_than_quantization_moves_the_model(engines: dict) -> None:
    """The reference difference must be smaller than what a scheme changes, or it could not bound anything."""
    bf16 = _difference(engines, "BF16")
    gptq_effect = abs_diff(engines["runtime"]["INT4-GPTQ"], engines["runtime"]["BF16"])
    print(
        f"BF16: mean |d logprob| vLLM vs runtime {bf16.mean():.4f} (max {bf16.max():.4f}); INT4-GPTQ vs BF16 {gptq_effect.mean():.4f}"
    )
    assert significantly_below(bf16, gptq_effect), (float(bf16.mean()), float(gptq_effect.mean()))


@pytest.mark.parametrize("scheme", ["INT4-GPTQ", "INT4-AWQ"])
def test_int4_exports_match_vllm_as_closely_as_bf16(engines: dict, scheme: str) -> None:
    bf16, other = _difference(engines, "BF16"), _difference(engines, scheme)
    print(f"{scheme}: mean |d logprob| {other.mean():.4f}, bound {paired_bound(bf16, 1.0, other):.4f}")
    assert other.mean() <= paired_bound(bf16, 1.0, other), (scheme, float(other.mean()), float(bf16.mean()))


def test_int8_dynamic_matches_vllm_within_its_amplified_rounding_difference(engines: dict) -> None:
    """INT8-Dynamic against vLLM: BF16's difference times the factor by which int8 activations amplify a
    rounding-level change, measured on quantbench's runtime (float32 against bfloat16 compute)."""
    dirs, prompts, runtime = engines["dirs"], engines["prompts"], engines["runtime"]
    amplified = abs_diff(
        runtime_logprobs(dirs["INT8-Dynamic"], prompts["INT8-Dynamic"], torch.float32), runtime["INT8-Dynamic"]
    )
    plain = abs_diff(runtime_logprobs(dirs["BF16"], prompts["BF16"], torch.float32), runtime["BF16"])
    factor = float(amplified.mean() / plain.mean())
    bf16, int8 = _difference(engines, "BF16"), _difference(engines, "INT8-Dynamic")
    print(
        f"INT8-Dynamic: mean |d logprob| {int8.mean():.4f}, bound {paired_bound(bf16, factor, int8):.4f} "
        f"(factor {factor:.2f} = {amplified.mean():.4f} / {plain.mean():.4f})"
    )
    assert factor > 1.5  # the amplification is real: otherwise this bound would be loose for nothing
    assert int8.mean() <= paired_bound(bf16, factor, int8), (float(int8.mean()), float(bf16.mean()), factor)


FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_int8_dynamic_layers_compute_what_vllm_computes(engines: dict) -> None:
    """Every int8 linear of the first prompt, on vLLM's own input: quantbench's scales equal vLLM's bit for bit;
    its codes differ only at exact half-step ties (x * 127 / amax = k + 1/2), where vLLM's CPU kernel
    (multiplying by float32(1 / (amax / 127)), computed in double) and its CUDA kernel (127 / amax in float32),
    which quantbench follows, round apart; from vLLM's codes, quantbench's W8A8 product gives vLLM's output bit
    for bit, and so does its own forward on every token whose codes agree."""
    records = torch.load(engines["dump"])
    model, _ = load_model(engines["dirs"]["INT8-Dynamic"], dtype=torch.bfloat16)
    assert len(records) == 4 * model.config.num_hidden_layers
    ties = values = 0
    for name, r in records.items():
        parent, _, leaf = name.rpartition(".")
        modules = [model.get_submodule(f"{parent}.{part}") for part in FUSED.get(leaf, [leaf])]
        x, args = r["x"], modules[0].input_args
        codes, scales = qdq.int_activation_codes(x, args)
        assert torch.equal(scales, r["scales"]), name
        apart = codes != r["codes"].float()
        if not engines["cpu_build"]:
            assert not apart.any(), name  # vLLM's CUDA kernel: the formula quantbench follows
        quotient = x.double() * 127 / x.double().abs().amax(-1, keepdim=True)
        assert (quotient[apart] - quotient[apart].floor() == 0.5).all(), name
        assert ((codes - r["codes"].float()).abs()[apart] == 1).all(), name
        ties, values = ties + int(apart.sum()), values + apart.numel()
        weight_codes = torch.cat([m.weight_codes for m in modules])
        weight_scale = torch.cat([m.weight_scale for m in modules])
        from_vllm_codes = qdq.scaled_int_matmul(
            r["codes"], r["scales"], weight_codes, weight_scale, None, torch.bfloat16
        )
        assert torch.equal(from_vllm_codes.view(torch.int16), r["y"].view(torch.int16)), name
        ours = torch.cat([m(x) for m in modules], dim=-1)
        agree = ~apart.any(dim=-1)
        assert torch.equal(ours[agree].view(torch.int16), r["y"][agree].view(torch.int16)), name
    print(f"int8 codes apart from vLLM's: {ties} of {values}")
    assert ties < 1e-3 * values and (ties > 0) == engines["cpu_build"]  # bf16 inputs do sit on ties; few


@pytest.mark.parametrize("scheme", ["FP8-Dynamic", "FP8-Static"])
def test_fp8_does_not_load_in_vllms_cpu_build(engines: dict, scheme: str) -> None:
    """The CPU build registers no fp8 quantization op: loading stops at its schema (README)."""
    cpu_build_only(engines)
    error = engines["vllm"][scheme].get("error", "")
    assert "static_scaled_fp8_quant() expected at most 0 argument(s)" in error, engines["vllm"][scheme]


def test_moe_bf16_matches_and_int8_experts_do_not_load(engines: dict, shared_dir: Path) -> None:
    """vLLM's fused MoE (top-2 routing, renormalised weights, one kernel for the experts) computes the MoE
    fixture as closely to transformers as the dense fixture's layers agree (same tokenizer, same tokens).
    The MoE fixture is ../shared's (``shared_dir`` skips the test without it, or fails it under CI)."""
    assert "MoE-BF16" in engines["vllm"]
    dense, moe = _difference(engines, "BF16"), _difference(engines, "MoE-BF16")
    print(f"MoE BF16: mean |d logprob| {moe.mean():.4f}, bound {paired_bound(dense, 1.0, moe):.4f}")
    assert engines["prompts"]["MoE-BF16"] == engines["prompts"]["BF16"]
    assert moe.mean() <= paired_bound(dense, 1.0, moe), (float(moe.mean()), float(dense.mean()))
    cpu_build_only(engines)
    assert "No Int8 MoE backend supports the deployment configuration" in engines["vllm"]["MoE-INT8-Dynamic"].get(
        "error", ""
    )


def test_qwen2_5_vl_does_not_load_without_torchvision(engines: dict) -> None:
    """vLLM's Qwen2.5-VL imports transformers' Qwen2-VL image processor, which imports torchvision; the only
    torchvision on PyPI is a CUDA build that cannot load beside the CPU torch (the vLLM environment drops it)."""
    cpu_build_only(engines)
    assert "Qwen2_5_VLForConditionalGeneration" in engines["vllm"]["VL-BF16"].get("error", ""), engines["vllm"][
        "VL-BF16"
    ]
    assert "No module named 'torchvision'" in engines["log"]


def _workdir(tmp_path: Path, backend: dict) -> Path:
    """The vLLM demo config, BF16 only, the demo's lm-eval benchmarks on smaller subsets."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "resources").symlink_to(REPO / "resources")
    path = tmp_path / "config" / "vllm-cpu.yaml"
    config = yaml.safe_load(path.read_text())
    config["models"]["tinyqwen3-dense"]["schemes"] = ["BF16"]
    config["evaluation"]["backend"] = backend
    config["evaluation"]["overrides"] = {
        "CEVAL": {"limit": 2},
        "MMLU": {"limit": 2},
        "GSM8K": {"limit": 4, "max_gen_toks": 32},
        "HUMANEVAL": {"limit": 4, "max_gen_toks": 48},
    }
    config["tables"][0]["benchmarks"] = LM_EVAL_BENCHMARKS
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path


@pytest.mark.workflow
def test_vllm_backend_scores_the_demo_through_the_workflow_as_hf_does(engines: dict, tmp_path: Path) -> None:
    """``make demo-vllm``'s workflow on BF16: every lm-eval benchmark through lm-eval's vllm model (published
    settings: add_bos_token, dtype auto, no chat template, tensor parallelism from the sizing rule), then the
    same items on the hf backend in bfloat16 (vLLM's dtype auto for this checkpoint).

    Bound: a multiple-choice answer can change only where hf's margin between the two answers is below twice
    the largest per-token log-prob difference the BF16 model showed between the engines (each answer's
    log-prob moves by at most that much); a generated answer is scored identically wherever the two
    continuations are equal, and the share of items whose continuations differ bounds the score difference.
    """
    wd = _workdir(tmp_path, {"name": "vllm", "device": "cpu", "dtype": "auto"})
    # as make demo-vllm: vLLM's engine in the job's process (no engine process to start per job; the spawned
    # one of vLLM's default imports the job's script again: test_workflow checks the script allows that)
    run_vllm(
        [
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(wd),
            "--configfile",
            str(wd / "config" / "vllm-cpu.yaml"),
            "--cores",
            "1",
        ],
        vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"),
    )
    delta = float(_difference(engines, "BF16").max())
    benchmarks = load_benchmarks(wd / "config" / "benchmarks.yaml")
    config = yaml.safe_load((wd / "config" / "vllm-cpu.yaml").read_text())
    table = (wd / "results-vllm" / "tables" / "table-demo-vllm.csv").read_text().splitlines()
    assert table[0] == "model,scheme," + ",".join(LM_EVAL_BENCHMARKS)
    for name in LM_EVAL_BENCHMARKS:
        vllm_result = json.loads(
            (wd / "results-vllm" / "evals" / "tinyqwen3-dense" / "BF16" / f"{name}.json").read_text()
        )
        assert vllm_result["backend"] == {"name": "vllm", "device": "cpu", "dtype": "auto", "tensor_parallel_size": 1}
        assert vllm_result["versions"]["vllm"].endswith("+cpu")
        overrides = dict(config["evaluation"]["overrides"][name])
        limit = overrides.pop("limit")
        hf_result = evaluate_benchmark(
            DENSE,
            benchmarks[name].with_overrides(overrides),
            out_path=tmp_path / f"hf-{name}.json",
            model_name="tinyqwen3-dense",
            data_dir=REPO / "resources" / "data",
            limit=limit,
            backend=Backend(name="hf", device="cpu", dtype="bfloat16", threads=1),
        )
        hf = {(i["task"], i["doc_id"]): i for i in hf_result["details"]["per_item"]}
        vllm = {(i["task"], i["doc_id"]): i for i in vllm_result["details"]["per_item"]}
        assert hf.keys() == vllm.keys() and len(hf) == vllm_result["items"] == hf_result["items"]
        changed = 0
        for key, h in hf.items():
            v = vllm[key]
            if "loglikelihoods" in h:
                choice_h = max(range(len(h["loglikelihoods"])), key=h["loglikelihoods"].__getitem__)
                choice_v = max(range(len(v["loglikelihoods"])), key=v["loglikelihoods"].__getitem__)
                if choice_h != choice_v:
                    changed += 1
                    assert h["loglikelihoods"][choice_h] - h["loglikelihoods"][choice_v] < 2 * delta, (name, key, h, v)
                else:
                    assert h["score"] == v["score"]
            elif h["response"] == v["response"]:
                assert h["score"] == v["score"], (name, key)
            else:
                changed += 1
        print(
            f"{name}: vllm {vllm_result['score']:.2f}, hf {hf_result['score']:.2f}, {changed} of {len(hf)} answers differ"
        )
        assert abs(vllm_result["score"] - hf_result["score"]) <= 100 * changed / len(hf), (name, changed)


def test_lmms_eval_builds_its_vllm_model_on_our_checkpoint(engines: dict, tmp_path: Path) -> None:
    """lmms-eval 0.7.3 builds its ``vllm`` model (as its ``simple_evaluate`` does) from quantbench's arguments:
    vLLM gets our checkpoint, tensor parallelism 1 (the sizing rule on a CPU) and the published batch of 16.
    The tiny Qwen2.5-VL stops where vLLM inspects its architecture (torchvision, as above), so no lmms-eval task
    runs here; the text checkpoint shows the arguments reach vLLM."""
    cpu_build_only(engines)
    job = {"models": {"VL-BF16": str(engines["dirs"]["VL-BF16"]), "INT8-Dynamic": str(engines["dirs"]["INT8-Dynamic"])}}
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    run_vllm(
        [str(REPO / "tests" / "lmms_eval_worker.py"), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
        vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"),
    )
    built = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert "Qwen2_5_VLForConditionalGeneration" in built["VL-BF16"]["error"]
    text = built["INT8-Dynamic"]
    assert text["class"] == "lmms_eval.models.chat.vllm.VLLM"
    assert text["loaded"] == job["models"]["INT8-Dynamic"]
    assert (text["tensor_parallel_size"], text["batch_size_per_gpu"], text["dtype"]) == (1, 16, "torch.bfloat16")

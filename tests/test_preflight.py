"""Preflight of quantize and evaluate jobs: measured free disk and memory against estimated needs, one clear
error naming what is short and by how much, raised before the model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from quantbench.checkpoint.export import save_quantized
from quantbench.checkpoint.load import load_model
from quantbench.checkpoint.preflight import (
    GIB,
    Headroom,
    Requirement,
    available_memory,
    check_requirements,
    checkpoint_bytes,
    evaluate_requirements,
    free_disk,
    quantize_requirements,
)
from quantbench.checkpoint.weightfiles import model_tensors
from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.evaluate.runner import evaluate_benchmark
from quantbench.quant.quantize import quantize_checkpoint, quantize_model
from quantbench.quant.resume import partial_dir
from quantbench.quant.schemes import load_schemes
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "resources" / "models" / "tinyqwen3-dense"
SCHEMES = load_schemes(REPO / "config" / "schemes.yaml")


def test_the_check_names_each_shortfall_and_passes_what_fits():
    disk = Requirement("free disk at /scratch/q for the checkpoint", need=10 * GIB, have=4 * GIB)
    memory = Requirement("host memory for the model in BF16", need=470 * GIB, have=int(251.5 * GIB))
    fits = Requirement("free disk at /scratch/e for the result", need=2**20, have=2**40)
    check_requirements([fits], "evaluate m")
    with pytest.raises(QuantbenchError) as error:
        check_requirements([disk, fits, memory], "quantize m under INT4-GPTQ")
    assert str(error.value) == (
        "quantize m under INT4-GPTQ cannot run here: "
        "free disk at /scratch/q for the checkpoint: need 10.00 GiB, have 4.00 GiB, short by 6.00 GiB; "
        "host memory for the model in BF16: need 470.00 GiB, have 251.50 GiB, short by 218.50 GiB. "
        "Free some, or run it where there is more"
    )


def test_measured_free_disk_and_memory(tmp_path):
    assert free_disk(tmp_path / "not" / "yet" / "there") == shutil.disk_usage(tmp_path).free
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = available_memory()
    assert 0 < available <= int(meminfo["MemAvailable"].split()[0]) * 1024 + 64 * 2**20  # it moves a little meanwhile


@pytest.mark.slow
@pytest.mark.parametrize("name", ["INT4-RTN", "INT8-Dynamic", "FP8-Dynamic"])
def test_estimates_cover_what_the_job_really_takes(tmp_path, name):
    """The checkpoint estimate holds the exported checkpoint's weights, within 5%; the memory estimate is the
    BF16 model's bytes as loaded."""
    scheme = SCHEMES[name]
    model, tokenizer = load_model(DEMO)
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_model(model, scheme, device="cpu")
    out = save_quantized(model, tokenizer, scheme, tmp_path / name, provenance={})
    written = (out / "model.safetensors").stat().st_size
    estimate, in_blocks = checkpoint_bytes(model_tensors(DEMO), scheme)
    assert written <= estimate <= 1.05 * written
    embeddings = 8192 * 384 * 2  # the only tensor outside the blocks but the final norm
    assert in_blocks == pytest.approx(estimate - embeddings, abs=384 * 2)

    memory, disk = quantize_requirements(
        DEMO, scheme, tmp_path / "q", progress_dir=tmp_path / "q.partial", host_activations=None
    )
    assert memory.need == loaded
    assert disk.need == estimate + in_blocks


@pytest.mark.parametrize("scheme_name", ["INT8-Dynamic", "FP8-Dynamic"])
def test_evaluation_memory_on_the_cpu(tmp_path, scheme_name):
    """For a float32 CPU evaluation: the codes (and, but for W8A8's integer matmuls, their dequantized float32
    copy), the rest in float32."""
    scheme = SCHEMES[scheme_name]
    model, tokenizer = load_model(DEMO)
    quantize_model(model, scheme, device="cpu")
    out = save_quantized(model, tokenizer, scheme, tmp_path / "int8", provenance={})
    loaded, _ = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        loaded(torch.zeros(1, 4, dtype=torch.long))  # every quantized module builds its dequantized weight
    held = {t.data_ptr(): t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()]}
    copies = [m._dequantized for m in loaded.modules() if getattr(m, "_dequantized", None) is not None]
    assert bool(copies) == (scheme_name == "FP8-Dynamic")
    held.update((copy.data_ptr(), copy.numel() * 4) for copy in copies)
    memory, _ = evaluate_requirements(out, tmp_path / "r.json", host_dtype_bytes=4)
    rotary = loaded.model.rotary_emb.inv_freq.numel() * 4
    assert memory.need == pytest.approx(sum(held.values()) - rotary, rel=0.01)
    assert [r.what for r in evaluate_requirements(out, tmp_path / "r.json", host_dtype_bytes=None)] == [
        f"free disk at {tmp_path} for the result"
    ]


def unloadable_copy(tmp_path: Path) -> Path:
    """The demo model with a config transformers cannot build: loading it fails with transformers' own error."""
    model = tmp_path / "model"
    shutil.copytree(DEMO, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_impossible_needs_stop_quantize_and_evaluate_before_loading(tmp_path):
    model = unloadable_copy(tmp_path)
    out = tmp_path / "quantized" / "INT4-RTN"
    with pytest.raises(Exception, match="no-such-architecture"):  # the trap: loading would fail like this
        quantize_checkpoint(model, SCHEMES["INT4-RTN"], out, device="cpu")
    free = free_disk(out.parent)
    with pytest.raises(QuantbenchError) as error:
        quantize_checkpoint(model, SCHEMES["INT4-RTN"], out, device="cpu", headroom=Headroom(disk_bytes=2**60))
    need = checkpoint_bytes(model_tensors(model), SCHEMES["INT4-RTN"])
    assert str(error.value).startswith(
        f"quantize {model} under INT4-RTN cannot run here: free disk at {out.parent} for the checkpoint and its "
        f"per-layer progress: need {(sum(need) + 2**60) / GIB:.2f} GiB, have {free / GIB:.2f} GiB, short by"
    )
    assert not out.exists() and not partial_dir(out).exists()
    with pytest.raises(QuantbenchError, match=r"host memory for the model in BF16: need 1073741824\.\d\d GiB"):
        quantize_checkpoint(model, SCHEMES["INT4-RTN"], out, device="cpu", headroom=Headroom(memory_bytes=2**60))

    result = tmp_path / "evals" / "WIKITEXT2.json"
    spec = load_benchmarks(REPO / "config" / "benchmarks.yaml")["WIKITEXT2"]
    with pytest.raises(
        QuantbenchError,
        match=rf"evaluate {model} on WIKITEXT2 cannot run here: host memory for the "
        r"model \(4-byte values\): need 1073741824\.\d\d GiB",
    ):
        evaluate_benchmark(
            model,
            spec,
            out_path=result,
            model_name="m",
            data_dir=REPO / "resources" / "data",
            headroom=Headroom(memory_bytes=2**60),
        )
    assert not result.parent.exists()

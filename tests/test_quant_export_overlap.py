"""The checkpoint written while the model is being quantized (quantbench.checkpoint.export.CheckpointExport)
has the same bytes as the one written after it, and an error on either side leaves nothing behind.

The fixtures are ../shared's tiny dense and MoE Qwen3 (6 layers each), calibrated on 4 x 48 tokens of the
held-out text; small shards (300 kB), so that the weight files are cut while blocks are still quantizing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from quantbench.calibration.samples import tokenize_calibration
from quantbench.checkpoint.export import WEIGHTS_INDEX_FILE, CheckpointExport, save_quantized
from quantbench.checkpoint.load import load_model
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_checkpoint, quantize_model
from quantbench.quant.schemes import Scheme, load_schemes
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
SCHEMES = load_schemes(REPO / "config" / "schemes.yaml")
SHARD_BYTES = 300_000

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scheme(name: str, fixture: str) -> Scheme:
    """The MoE fixture's experts have 192 inputs: groups of 64."""
    scheme = SCHEMES[name]
    if fixture == "moe" and scheme.weights.group_size:
        scheme = dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, group_size=64))
    return scheme


@pytest.fixture(scope="module")
def fixtures(shared_dir: Path) -> dict:
    """``fixtures[name]``: the fixture's directory, tokenizer and calibration, loaded on first use."""

    class Loaded(dict):
        def __missing__(self, name: str) -> dict:
            model_dir = shared_dir / "models" / f"tinyqwen3-{name}"
            _, tokenizer = load_model(model_dir)
            calibration = tokenize_calibration(
                tokenizer, shared_dir / "data" / "calib" / "gutenberg_heldout.jsonl", 4, 48, seed=0
            )
            self[name] = {"dir": model_dir, "tokenizer": tokenizer, "calibration": calibration}
            return self[name]

    return Loaded()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _fresh(fixture: dict) -> nn.Module:
    model, _ = load_model(fixture["dir"])
    return model


@pytest.mark.parametrize(("fixture", "name"), [("dense", "INT4-GPTQ"), ("moe", "INT4-GPTQ"), ("dense", "FP8-Dynamic")])
def test_overlapped_export_writes_the_same_bytes(fixtures: dict, tmp_path: Path, fixture: str, name: str) -> None:
    env, scheme = fixtures[fixture], _scheme(name, fixture)
    provenance = {"seed": 0}

    after = _fresh(env)
    quantize_model(after, scheme, env["calibration"], device="cpu")
    reference = save_quantized(
        after, env["tokenizer"], scheme, tmp_path / "after", provenance=provenance, max_shard_bytes=SHARD_BYTES
    )

    during = _fresh(env)
    with CheckpointExport(during, tmp_path / "during", max_shard_bytes=SHARD_BYTES) as export:
        quantize_model(during, scheme, env["calibration"], device="cpu", export=export)
        export.finish(env["tokenizer"], scheme, provenance=provenance)

    expected = _files(reference)
    assert WEIGHTS_INDEX_FILE in expected and sum(n.startswith("model-") for n in expected) > 6  # shards mid-model
    assert _files(tmp_path / "during") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after", "during"]


def test_quantize_checkpoint_writes_what_save_quantized_writes(fixtures: dict, tmp_path: Path) -> None:
    """quantize_checkpoint exports while quantizing; its weights and config are the in-memory path's bytes."""
    env, scheme = fixtures["moe"], _scheme("INT4-GPTQ", "moe")
    out = quantize_checkpoint(env["dir"], scheme, tmp_path / "ckpt", calibration=env["calibration"], device="cpu")
    model = _fresh(env)
    quantize_model(model, scheme, env["calibration"], device="cpu")
    reference = save_quantized(model, env["tokenizer"], scheme, tmp_path / "mem", provenance={})
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_a_quantization_error_leaves_nothing(fixtures: dict, tmp_path: Path) -> None:
    """Block 3 holds a NaN: the export has written the first blocks' shards by then; all of it goes."""
    env, scheme = fixtures["dense"], _scheme("INT4-GPTQ", "dense")
    model = _fresh(env)
    model.model.layers[3].mlp.up_proj.weight.data[0, 0] = float("nan")
    with (
        pytest.raises(QuantbenchError, match=r"model\.layers\.3\.mlp\.up_proj\.weight holds NaN"),
        CheckpointExport(model, tmp_path / "out", max_shard_bytes=SHARD_BYTES) as export,
    ):
        quantize_model(model, scheme, env["calibration"], device="cpu", export=export)
    assert isinstance(model.model.layers[2].mlp.up_proj, QuantLinear)  # it failed mid-model
    assert list(tmp_path.iterdir()) == []


def test_a_writer_error_surfaces_and_leaves_nothing(fixtures: dict, tmp_path: Path) -> None:
    """An output embedding untied from the input one under ``tie_word_embeddings: true`` fails in the writing
    thread (once block 0 is done); the error reaches the caller and no output remains."""
    env, scheme = fixtures["dense"], _scheme("INT4-GPTQ", "dense")
    model = _fresh(env)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    with (
        pytest.raises(QuantbenchError, match="tie_word_embeddings is true but the output embedding"),
        CheckpointExport(model, tmp_path / "out", max_shard_bytes=SHARD_BYTES) as export,
    ):
        quantize_model(model, scheme, env["calibration"], device="cpu", export=export)
        export.finish(env["tokenizer"], scheme, provenance={})
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_finish_leaves_nothing(fixtures: dict, tmp_path: Path) -> None:
    env, scheme = fixtures["dense"], _scheme("FP8-Dynamic", "dense")
    model = _fresh(env)
    with pytest.raises(RuntimeError, match="without finish"), CheckpointExport(model, tmp_path / "out") as export:
        quantize_model(model, scheme, device="cpu", export=export)
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / ".out.killed.tmp"  # what a killed export leaves: removed by the next one
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    save_quantized(model, env["tokenizer"], scheme, tmp_path / "out", provenance={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(load_model(tmp_path / "out")[0].lm_head.weight, model.lm_head.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="blocks return home in the background on CUDA only")
@pytest.mark.parametrize("fixture", ["dense", "moe"])
def test_overlapped_export_on_cuda_writes_what_the_model_holds(fixtures: dict, tmp_path: Path, fixture: str) -> None:
    """On CUDA blocks go home on a background stream while the writer waits for them: the files written during
    the quantization equal those save_quantized writes afterwards from the same quantized model."""
    env, scheme = fixtures[fixture], _scheme("INT4-GPTQ", fixture)
    model = _fresh(env)
    with CheckpointExport(model, tmp_path / "during", max_shard_bytes=SHARD_BYTES) as export:
        quantize_model(model, scheme, env["calibration"], device="cuda", export=export)
        export.finish(env["tokenizer"], scheme, provenance={})
    after = save_quantized(
        model, env["tokenizer"], scheme, tmp_path / "after", provenance={}, max_shard_bytes=SHARD_BYTES
    )
    assert _files(tmp_path / "during") == _files(after)

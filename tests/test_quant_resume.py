"""Quantization resumes per layer: a run killed with SIGKILL continues from its last saved layer and writes
the same bytes as an uninterrupted run (quantbench.quant.resume).

Every run is a real process (`python -c RUN`), killed by a real SIGKILL it sends itself at a chosen point:
``after:K`` once layer K's state is on disk, ``during:K`` inside layer K's quantization (its first group's
solve). The fixtures are ../shared's tiny dense and MoE Qwen3 (6 layers each).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantbench.calibration.samples import load_calibration, save_calibration, tokenize_calibration
from quantbench.quant.resume import IDENTITY_FILE, LayerProgress, partial_dir, run_identity
from quantbench.quant.schemes import Scheme, load_schemes
from quantbench.quant.sequential import PipelineOptions

REPO = Path(__file__).resolve().parents[1]
SCHEMES = load_schemes(REPO / "config" / "schemes.yaml")
LAYERS = 6

pytestmark = pytest.mark.slow

# One quantize_checkpoint run on one torch thread (as every run here, so that all compute alike), killed
# where argv[5] says. argv: model dir, scheme JSON, calibration file or '-', output dir, kill point or '-'.
RUN = """
import json, logging, os, signal, sys
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from quantbench.quant import resume, sequential
from quantbench.quant.quantize import quantize_checkpoint
from quantbench.quant.schemes import scheme_from_dict

model, scheme, calib, out, kill = sys.argv[1:6]
if kill != "-":
    when, layer = kill.split(":")
    prefix = f"model.layers.{layer}."
    if when == "after":
        save = resume.LayerProgress.save
        def save_then_die(self, stack_path, index, *args):
            save(self, stack_path, index, *args)
            if index == int(layer):
                self.wait()
                os.kill(os.getpid(), signal.SIGKILL)
        resume.LayerProgress.save = save_then_die
    else:
        quantize_group = sequential._quantize_group
        def die_in_layer(block, group, *args):
            if group.report.linears[0].startswith(prefix):
                os.kill(os.getpid(), signal.SIGKILL)
            return quantize_group(block, group, *args)
        sequential._quantize_group = die_in_layer
quantize_checkpoint(model, scheme_from_dict(json.loads(scheme)), out, calibration=None if calib == "-" else calib,
                    device="cpu")
"""


def run_quantize(
    model_dir: Path, scheme: Scheme, calib: Path | None, out: Path, kill: str = "-"
) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", RUN, str(model_dir), json.dumps(scheme.to_dict()), str(calib or "-"), str(out), kill]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600)


def saved_layers(out: Path) -> list[str]:
    return sorted(p.name for p in partial_dir(out).glob("*.safetensors"))


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def small_groups(scheme: Scheme) -> Scheme:
    """The MoE fixture's experts have 192 inputs: groups of 64."""
    return dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, group_size=64))


@pytest.fixture(scope="module")
def calib_files(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoTokenizer

    data = shared_dir / "data" / "calib" / "gutenberg_heldout.jsonl"
    out = {}
    for name in ("dense", "moe"):
        tokenizer = AutoTokenizer.from_pretrained(shared_dir / "models" / f"tinyqwen3-{name}")
        path = tmp_path_factory.mktemp("calib") / f"{name}.safetensors"
        out[name] = save_calibration(tokenize_calibration(tokenizer, data, 4, 48, seed=0), path)
    return out


@pytest.mark.parametrize(
    ("model", "scheme", "kills"),
    [
        # killed three times: after layer 0, inside layer 3, after the last layer (before the export)
        ("dense", SCHEMES["INT4-GPTQ"], ["after:0", "during:3", "after:5"]),
        # AWQ folds its smoothing scales into the norms: the restored blocks carry them
        ("moe", small_groups(SCHEMES["INT4-AWQ"]), ["during:1", "after:3"]),
        # data-free: restored blocks are not replayed, nothing is captured
        ("dense", SCHEMES["FP8-Dynamic"], ["after:2"]),
    ],
    ids=["dense-gptq", "moe-awq", "dense-fp8-dynamic"],
)
def test_killed_runs_resume_to_the_same_bytes(shared_dir, calib_files, tmp_path, model, scheme, kills):
    model_dir = shared_dir / "models" / f"tinyqwen3-{model}"
    calib = calib_files[model] if scheme.needs_calibration else None
    reference = tmp_path / "uninterrupted"
    done = run_quantize(model_dir, scheme, calib, reference)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not partial_dir(reference).exists()  # removed once the checkpoint is written

    out = tmp_path / "resumed"
    saved = 0
    for kill in kills:
        killed = run_quantize(model_dir, scheme, calib, out, kill)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert not out.exists()  # no half-written checkpoint, and none that looks complete
        when, layer = kill.split(":")
        saved_now = int(layer) + 1 if when == "after" else int(layer)
        assert saved_layers(out) == [f"model.layers.{i:05d}.safetensors" for i in range(saved_now)]
        if saved:  # this run resumed from the previous one's layers
            assert f"resuming from {partial_dir(out)}: {saved} quantized layer(s) saved" in killed.stderr
        saved = saved_now
    finished = run_quantize(model_dir, scheme, calib, out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"model.layers: blocks 0-{saved - 1} restored" in finished.stderr
    assert "differ from the first run's" not in finished.stderr  # the replayed activations were bit-identical
    assert not partial_dir(out).exists()

    ours, theirs = files(out), files(reference)
    assert sorted(ours) == sorted(theirs) and "model.safetensors" in ours
    for name in theirs:
        assert ours[name] == theirs[name], name


def test_progress_of_other_inputs_is_discarded(shared_dir, calib_files, tmp_path, caplog):
    """A progress directory is reused only by a run of the same model, scheme, calibration, seed and options."""
    model_dir = shared_dir / "models" / "tinyqwen3-dense"
    calibration = load_calibration(calib_files["dense"])
    scheme = SCHEMES["INT4-GPTQ"]
    import torch

    def identity(**changes):
        args = {"scheme": scheme, "calibration": calibration, "seed": 0, "options": PipelineOptions()} | changes
        return run_identity(model_dir, args.pop("scheme"), args.pop("calibration"), device=torch.device("cpu"), **args)

    directory = tmp_path / "q.partial"
    first = identity()
    with LayerProgress(directory, first):
        (directory / "model.layers.00000.safetensors").write_bytes(b"a saved layer")
    assert identity() == first and json.loads((directory / IDENTITY_FILE).read_text()) == first
    with caplog.at_level(logging.INFO, logger="quantbench.quant.resume"), LayerProgress(directory, identity()) as same:
        assert same.finished("model.layers") == 1
    assert f"resuming from {directory}: 1 quantized layer(s) saved" in caplog.text

    fewer = dataclasses.replace(
        calibration, input_ids=calibration.input_ids[:2], attention_mask=calibration.attention_mask[:2]
    )
    bigger_groups = dataclasses.replace(scheme, weights=dataclasses.replace(scheme.weights, group_size=64))
    for changes, changed in [
        ({"calibration": fewer}, "calibration"),
        ({"scheme": bigger_groups}, "scheme"),
        ({"seed": 1}, "seed"),
        ({"options": PipelineOptions(chunk_size=2)}, "options"),
    ]:
        with LayerProgress(directory, first):
            (directory / "model.layers.00000.safetensors").write_bytes(b"a saved layer")
        caplog.clear()
        other = identity(**changes)
        with (
            caplog.at_level(logging.WARNING, logger="quantbench.quant.resume"),
            LayerProgress(directory, other) as fresh,
        ):
            assert fresh.finished("model.layers") == 0
        assert (
            f"discarding the saved progress in {directory}: it was written for other inputs (changed: {changed})"
            in caplog.text
        )
        assert sorted(os.listdir(directory)) == [IDENTITY_FILE]
        assert json.loads((directory / IDENTITY_FILE).read_text()) == other

    threads = torch.get_num_threads()  # CPU results may depend on it
    torch.set_num_threads(threads + 1)
    try:
        assert identity()["device"] == f"cpu ({threads + 1} threads)" != first["device"]
    finally:
        torch.set_num_threads(threads)

"""`quantbench quantize` end to end: calibration file in, compressed-tensors checkpoint out, byte-identical reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantbench.cli import main
from quantbench.util.provenance import sha256_file


@pytest.fixture(scope="module")
def calib_file(book_chunks_file: Path, dense_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "gutenberg.safetensors"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(dense_model_dir),
                "--data",
                str(book_chunks_file),
                "--num-samples",
                "4",
                "--max-seq-len",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.mark.slow
def test_quantize_twice_gives_the_same_bytes(tmp_path: Path, dense_model_dir: Path, calib_file: Path) -> None:
    outs = [tmp_path / name for name in ("a", "b")]
    for out in outs:
        argv = [
            "quantize",
            "--model",
            str(dense_model_dir),
            "--scheme",
            "FP8-Static",
            "--calib",
            str(calib_file),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--seed",
            "7",
        ]
        assert main(argv) == 0
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and "model.safetensors" in files
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    provenance = json.loads((outs[0] / "quantbench_provenance.json").read_text())
    assert provenance["seed"] == 7
    assert provenance["calibration"]["file_sha256"] == sha256_file(calib_file)
    assert provenance["calibration"]["num_samples"] == 4
    stats = provenance["quantization"]
    assert stats["calibration_tokens"] == 128 and stats["fallbacks"] == []
    assert len(stats["layers"]) == 6 and all(0 < layer["rel_error"] < 0.01 for layer in stats["layers"])
    config = json.loads((outs[0] / "config.json").read_text())
    assert "quantization_config" in config


def test_quantize_user_errors(tmp_path: Path, dense_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["quantize", "--model", str(dense_model_dir), "--out", str(tmp_path / "q"), "--device", "cpu"]
    assert main(base + ["--scheme", "INT4-GPTQ"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert main(base + ["--scheme", "INT5-MAGIC"]) == 2
    assert "unknown scheme 'INT5-MAGIC'" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()

"""Corrupt or wrong inputs are refused with the file or key named, and no output is written: truncated and
corrupt safetensors files (downloads, model directories, checkpoints), a quantization_config that disagrees
with its tensors, a Hub revision that does not exist (asked of a local fake Hub over HTTP)."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from quantbench.checkpoint.download import ModelSource, fetch_model
from quantbench.checkpoint.load import load_model
from quantbench.checkpoint.weightfiles import read_header
from quantbench.evaluate.benchmarks import load_benchmarks
from quantbench.evaluate.runner import evaluate_benchmark
from quantbench.quant.quantize import quantize_checkpoint
from quantbench.quant.resume import partial_dir
from quantbench.quant.schemes import load_schemes
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "resources" / "models" / "tinyqwen3-dense"
SCHEMES = load_schemes(REPO / "config" / "schemes.yaml")
REV = "0123456789abcdef0123456789abcdef01234567"


def copy_model(tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(DEMO, target)
    return target


def truncate(path: Path, drop: int) -> int:
    """Cut the last ``drop`` bytes of ``path`` (an interrupted copy); return the data bytes left."""
    data = path.read_bytes()
    path.write_bytes(data[:-drop])
    header = int.from_bytes(data[:8], "little")
    return len(data) - drop - 8 - header


# --- safetensors files --------------------------------------------------------------------------------


def test_a_whole_file_passes_and_each_damage_is_named(tmp_path):
    model = copy_model(tmp_path)
    weights = model / "model.safetensors"
    tensors = read_header(weights)
    assert len(tensors) == 68 and tensors["model.embed_tokens.weight"].shape == (8192, 384)
    data = sum(t.nbytes for t in tensors.values())
    assert weights.stat().st_size == 8 + int.from_bytes(weights.read_bytes()[:8], "little") + data

    left = truncate(weights, 1000)
    with pytest.raises(
        QuantbenchError,
        match=rf"{weights}: its header describes {data} bytes of tensor data but the file holds {left}; the file is truncated or corrupt",
    ):
        read_header(weights)
    weights.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(QuantbenchError, match=rf"{weights}: no complete safetensors header \(10 bytes in all\)"):
        read_header(weights)
    weights.write_bytes((12).to_bytes(8, "little") + b"not json at all")
    with pytest.raises(QuantbenchError, match=rf"{weights}: its header is not valid JSON"):
        read_header(weights)


def test_a_truncated_local_model_is_not_copied(tmp_path):
    source = copy_model(tmp_path, "source")
    truncate(source / "model.safetensors", 4096)
    with pytest.raises(QuantbenchError, match=rf"{source / 'model.safetensors'}: its header describes \d+ bytes"):
        fetch_model(ModelSource(path=source), tmp_path / "out" / "m")
    assert list((tmp_path / "out").iterdir()) == []


def _blob_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache as `hf download` leaves it: blobs named by their SHA-256 (LFS) and snapshot links."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / REV
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in DEMO.iterdir():
        blob = repo / "blobs" / hashlib.sha256(item.read_bytes()).hexdigest()
        shutil.copy(item, blob)
        (snapshot / item.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return snapshot


def test_hub_blobs_are_checked_against_their_hashes(tmp_path, monkeypatch):
    snapshot = _blob_cache(tmp_path, monkeypatch)
    out = fetch_model(ModelSource(repo="acme/tiny", revision=REV), tmp_path / "good")
    assert (out / "model.safetensors").read_bytes() == (DEMO / "model.safetensors").read_bytes()

    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor data: the header still describes the file
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    read_header(blob)
    with pytest.raises(
        QuantbenchError,
        match=rf"model\.safetensors: its content hashes to {hashlib.sha256(data).hexdigest()}, not to the SHA-256 {blob.name} the Hub recorded",
    ):
        fetch_model(ModelSource(repo="acme/tiny", revision=REV), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's answer for a revision a repo does not have (the repo exists): 404 + X-Error-Code."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        FakeHub.requests.append(self.path)
        body = json.dumps({"error": f"Invalid rev id: {self.path}"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RevisionNotFound")
        self.send_header("X-Error-Message", "Invalid rev id")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("revision", ["v9.9", "fedcba9876543210fedcba9876543210fedcba98"])
def test_a_hub_revision_that_does_not_exist(tmp_path, monkeypatch, revision):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    FakeHub.requests.clear()
    try:
        with pytest.raises(
            QuantbenchError, match=rf"hub repo acme/tiny has no revision '{revision}'; pin a commit hash"
        ):
            fetch_model(ModelSource(repo="acme/tiny", revision=revision), tmp_path / "m")
    finally:
        server.shutdown()
    assert FakeHub.requests and all(path.startswith("/api/models/acme/tiny/") for path in FakeHub.requests)
    assert revision in FakeHub.requests[0]
    assert not (tmp_path / "m").exists()


# --- checkpoints --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The demo model quantized to INT4 (RTN: no data), as a checkpoint of several shards."""
    from quantbench.checkpoint.export import save_quantized
    from quantbench.quant.quantize import quantize_model

    model, tokenizer = load_model(DEMO)
    quantize_model(model, SCHEMES["INT4-RTN"], device="cpu")
    return save_quantized(
        model,
        tokenizer,
        SCHEMES["INT4-RTN"],
        tmp_path_factory.mktemp("ckpt") / "int4",
        provenance={},
        max_shard_bytes=2**21,
    )


def broken_copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(checkpoint, target)
    return target


def test_a_truncated_shard_stops_loading_quantizing_and_evaluating(checkpoint, tmp_path):
    broken = broken_copy(checkpoint, tmp_path)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    shard = broken / index["model.layers.3.mlp.down_proj.weight_packed"]
    truncate(shard, 100)
    message = rf"{shard}: its header describes \d+ bytes of tensor data but the file holds \d+"
    with pytest.raises(QuantbenchError, match=message):
        load_model(broken)
    out = tmp_path / "evals" / "WIKITEXT2.json"
    spec = load_benchmarks(REPO / "config" / "benchmarks.yaml")["WIKITEXT2"]
    with pytest.raises(QuantbenchError, match=message):
        evaluate_benchmark(broken, spec, out_path=out, model_name="tiny", data_dir=REPO / "resources" / "data", limit=1)
    assert not out.parent.exists()

    model = copy_model(tmp_path)
    truncate(model / "model.safetensors", 1)
    out = tmp_path / "quantized" / "INT8-Dynamic"
    with pytest.raises(QuantbenchError, match=rf"{model / 'model.safetensors'}: its header describes"):
        quantize_checkpoint(model, SCHEMES["INT8-Dynamic"], out, device="cpu")
    assert not out.exists() and not partial_dir(out).exists()


def test_an_index_that_disagrees_with_its_shards(checkpoint, tmp_path):
    broken = broken_copy(checkpoint, tmp_path)
    index_file = broken / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (broken / last).unlink()
    with pytest.raises(
        QuantbenchError, match=rf"{index_file} names shard\(s\) \['{last}'\] that {broken} does not hold"
    ):
        load_model(broken)
    shutil.copy(checkpoint / last, broken / last)
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.norm.weight"] = first if index["weight_map"]["model.norm.weight"] != first else last
    index_file.write_text(json.dumps(index))
    with pytest.raises(
        QuantbenchError,
        match=r"places tensor 'model.norm.weight' in model-\d+-of-\d+.safetensors, whose header does not hold it",
    ):
        load_model(broken)


Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # groups of 64 would store twice the scales: the stored [384, 3] is not [384, 6]
        (
            lambda g: g["weights"].update(group_size=64),
            rf"tensor {Q_PROJ}\.weight_scale is BF16 \[384, 3\], but the quantization_config \(weights .*'group_size': 64.*\) stores "
            r"BF16/F16/F32/F64 \[384, 6\]; the config disagrees with the tensors",
        ),
        (lambda g: g["weights"].update(symmetric=False), rf"tensor {Q_PROJ}\.weight_zero_point is missing"),
        (
            lambda g: g.update(
                input_activations={
                    "type": "float",
                    "num_bits": 8,
                    "strategy": "tensor",
                    "symmetric": True,
                    "group_size": None,
                    "dynamic": False,
                }
            ),
            rf"tensor {Q_PROJ}\.input_scale is missing",
        ),
        (
            lambda g: g["weights"].update(num_bits=8, strategy="channel", group_size=None),
            rf"tensor {Q_PROJ}\.weight is missing",
        ),
    ],
    ids=["group-size", "asymmetric", "static-inputs", "int8"],
)
def test_a_quantization_config_that_disagrees_with_its_tensors(checkpoint, tmp_path, edit, message):
    broken = broken_copy(checkpoint, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    qconfig = config["quantization_config"]
    edit(qconfig["config_groups"]["group_0"])
    if qconfig["config_groups"]["group_0"]["weights"]["num_bits"] == 8:
        qconfig["format"] = "int-quantized"
    (broken / "config.json").write_text(json.dumps(config))
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    shard = broken / index[f"{Q_PROJ}.weight_scale"]
    with pytest.raises(QuantbenchError, match=rf"{shard}: {message}"):
        load_model(broken)

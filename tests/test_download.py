"""download: local copies and Hub snapshots served from a Hugging Face cache with HF_HUB_OFFLINE=1."""

import hashlib
import shutil
from pathlib import Path

import pytest

from quantbench.checkpoint.download import ModelSource, fetch_model
from quantbench.util.errors import QuantbenchError

DEMO = Path(__file__).resolve().parents[1] / "resources" / "models" / "tinyqwen3-dense"
REV = "0123456789abcdef0123456789abcdef01234567"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_copy_is_byte_identical(tmp_path):
    out = fetch_model(ModelSource(path=DEMO), tmp_path / "m")
    names = sorted(p.name for p in DEMO.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert digest(out / name) == digest(DEMO / name)


def test_local_path_without_config_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(QuantbenchError, match="no config.json"):
        fetch_model(ModelSource(path=tmp_path), tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary directory left behind either


@pytest.fixture()
def offline_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding acme/tiny at REV (what `hf download` leaves), with the Hub switched off."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for item in DEMO.iterdir():
        shutil.copy(item, snapshot / item.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return snapshot


def test_hub_snapshot_links_the_cached_files(offline_hub_cache, tmp_path):
    out = fetch_model(ModelSource(repo="acme/tiny", revision=REV), tmp_path / "m")
    for item in DEMO.iterdir():
        linked = out / item.name
        assert linked.is_symlink()
        assert linked.resolve() == (offline_hub_cache / item.name).resolve()
        assert digest(linked) == digest(item)


def test_hub_unreachable_names_repo_and_fix(offline_hub_cache, tmp_path):
    with pytest.raises(QuantbenchError, match=r"cannot fetch acme/missing@.*hf download acme/missing"):
        fetch_model(ModelSource(repo="acme/missing", revision=REV), tmp_path / "m")
    assert not (tmp_path / "m").exists()

"""Calibration data: record formats, seeded selection, padding masks, the saved file and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantbench.calibration.samples import (
    load_calibration,
    read_records,
    save_calibration,
    tokenize_calibration,
    tokenizer_fingerprint,
)
from quantbench.cli import main
from quantbench.util.errors import QuantbenchError
from quantbench.util.provenance import sha256_file


@pytest.fixture(scope="module")
def tokenizer(dense_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dense_model_dir)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_formats_tokenize_like_the_tokenizer(tmp_path: Path, tokenizer) -> None:
    chat = [
        {"role": "user", "content": "Where is the road?"},
        {"role": "assistant", "content": "Follow the yellow bricks."},
    ]
    sharegpt = [{"from": "human", "value": chat[0]["content"]}, {"from": "gpt", "value": chat[1]["content"]}]
    path = _write_jsonl(
        tmp_path / "mixed.jsonl", [{"text": "Once upon a time"}, {"messages": chat}, {"conversations": sharegpt}]
    )
    calibration = tokenize_calibration(tokenizer, path, 3, 64, seed=0)
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    expected_chat = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    expected_text = tokenizer("Once upon a time")["input_ids"]
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(calibration.input_ids, calibration.attention_mask)]
    assert sorted(rows, key=len) == sorted([expected_text, expected_chat, expected_chat], key=len)
    assert rendered.startswith("<|im_start|>user\n")  # the template really ran


def test_seeded_selection_truncation_and_right_padding(tmp_path: Path, tokenizer) -> None:
    texts = [" ".join(["word"] * n) for n in (3, 40, 7, 90, 12, 60)]
    path = _write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts] + [{"text": ""}])
    a = tokenize_calibration(tokenizer, path, 4, 32, seed=1)
    b = tokenize_calibration(tokenizer, path, 4, 32, seed=1)
    c = tokenize_calibration(tokenizer, path, 4, 32, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert not torch.equal(a.attention_mask, c.attention_mask) or not torch.equal(a.input_ids, c.input_ids)
    lengths = a.attention_mask.sum(dim=1)
    assert a.input_ids.shape[1] == int(lengths.max()) <= 32
    for ids, mask, length in zip(a.input_ids, a.attention_mask, lengths):
        assert mask[:length].all() and not mask[length:].any()  # real tokens first, then padding
        assert (ids[length:] == tokenizer.pad_token_id).all()
    assert a.num_tokens == int(lengths.sum())
    with pytest.raises(QuantbenchError, match="only 6 non-empty records"):
        tokenize_calibration(tokenizer, path, 7, 32)


def test_save_load_round_trip_and_metadata(tmp_path: Path, book_chunks_file: Path, tokenizer) -> None:
    source = book_chunks_file
    calibration = tokenize_calibration(tokenizer, source, 4, 48, seed=3)
    path = save_calibration(calibration, tmp_path / "calib" / "set.safetensors")
    loaded = load_calibration(path)
    assert torch.equal(loaded.input_ids, calibration.input_ids)
    assert torch.equal(loaded.attention_mask, calibration.attention_mask)
    assert loaded.metadata["source_sha256"] == sha256_file(source)
    assert (loaded.metadata["num_samples"], loaded.metadata["max_seq_len"], loaded.metadata["seed"]) == (4, 48, 3)
    assert loaded.metadata["tokenizer_sha256"] == tokenizer_fingerprint(tokenizer)
    assert [p.name for p in path.parent.iterdir()] == ["set.safetensors"]  # no temporary file left behind
    save_calibration(calibration, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_tokenizer_mismatch_is_refused(tmp_path: Path, book_chunks_file: Path, tokenizer) -> None:
    calibration = tokenize_calibration(tokenizer, book_chunks_file, 2, 16)
    calibration.metadata["tokenizer_sha256"] = "0" * 64
    with pytest.raises(QuantbenchError, match="another tokenizer"):
        calibration.check_tokenizer(tokenizer)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
        ('\n["text"]\n', r"bad\.jsonl:2: expected a JSON object, got list"),
        ('{"prompt": "x"}\n', "expected an object with 'text', 'messages' or 'conversations'"),
        ('{"conversations": [{"from": "robot", "value": "x"}]}\n', "'conversations' turn needs 'from'"),
        ("\n", "has no records"),
    ],
)
def test_bad_records_name_the_problem(tmp_path: Path, tokenizer, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(QuantbenchError, match=message):
        tokenize_calibration(tokenizer, path, 1, 8)


def test_missing_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(QuantbenchError, match="does not exist"):
        read_records(tmp_path / "absent.jsonl")
    with pytest.raises(QuantbenchError, match="quantbench calibrate"):
        load_calibration(tmp_path / "absent.safetensors")


def test_calibrate_cli(tmp_path: Path, book_chunks_file: Path, dense_model_dir: Path, tokenizer, capsys) -> None:
    out = tmp_path / "results" / "calib" / "tiny" / "gutenberg.safetensors"
    data = book_chunks_file
    argv = [
        "calibrate",
        "--model",
        str(dense_model_dir),
        "--data",
        str(data),
        "--num-samples",
        "5",
        "--max-seq-len",
        "20",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "5 samples, 100 tokens" in capsys.readouterr().out  # book chunks are far longer than 20 tokens
    assert torch.equal(load_calibration(out).input_ids, tokenize_calibration(tokenizer, data, 5, 20).input_ids)
    assert (
        main(["calibrate", "--model", str(dense_model_dir), "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)])
        == 2
    )

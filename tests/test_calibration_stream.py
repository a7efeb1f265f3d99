"""The calibration stream's options (quantbench's defaults against the published recipe's), per-scheme calibration
sets and scheme overrides in the run config: each option changes what it should, and nothing else."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from quantbench.calibration.samples import load_calibration, save_calibration, tokenize_calibration
from quantbench.calibration.stream import StreamSpec
from quantbench.run.config import load_run_config
from quantbench.util.errors import QuantbenchError

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
ANGELSLIM = StreamSpec(selection="first-n", format="angelslim", padding="max-length-unmasked")


@pytest.fixture(scope="module")
def tokenizer(dense_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dense_model_dir)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _rows(calibration) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(calibration.input_ids, calibration.attention_mask)]


def test_first_n_takes_the_first_records_in_file_order_and_shuffle_does_not(tmp_path, tokenizer):
    texts = [f"record number {i} " + "word " * (i + 1) for i in range(12)]
    path = _write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    first = tokenize_calibration(tokenizer, path, 5, 64, seed=3, stream=StreamSpec(selection="first-n"))
    assert _rows(first) == [tokenizer(t)["input_ids"] for t in texts[:5]]
    assert _rows(tokenize_calibration(tokenizer, path, 5, 64, seed=4, stream=StreamSpec(selection="first-n"))) == _rows(
        first
    )
    shuffled = tokenize_calibration(tokenizer, path, 5, 64, seed=3)
    order = list(range(12))
    random.Random(3).shuffle(order)
    assert _rows(shuffled) == [tokenizer(texts[i])["input_ids"] for i in order[:5]] != _rows(first)
    assert first.metadata["selection"] == "first-n" and shuffled.metadata["selection"] == "shuffle"


def test_angelslim_format_renders_the_first_sharegpt_pair_with_a_generation_prompt(tmp_path, tokenizer):
    turns = [
        ("human", "Where is the road?"),
        ("gpt", "Follow the bricks."),
        ("human", "And then?"),
        ("gpt", "Knock twice."),
    ]
    sharegpt = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    messages = {
        "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}],
        "system_prompt": "Be brief.",
    }
    path = _write_jsonl(tmp_path / "chats.jsonl", [sharegpt, messages, {"text": "Plain prose."}])
    ours = tokenize_calibration(tokenizer, path, 3, 256, stream=StreamSpec(selection="first-n"))
    theirs = tokenize_calibration(tokenizer, path, 3, 256, stream=StreamSpec(selection="first-n", format="angelslim"))

    def rendered(chat, **kwargs):
        return tokenizer(tokenizer.apply_chat_template(chat, tokenize=False, **kwargs))["input_ids"]

    pair = [{"role": "user", "content": turns[0][1]}, {"role": "assistant", "content": turns[1][1]}]
    whole = [{"role": "user" if f == "human" else "assistant", "content": v} for f, v in turns]
    system = [{"role": "system", "content": "Be brief."}, *messages["messages"]]
    assert _rows(theirs) == [
        rendered(pair, add_generation_prompt=True),
        rendered(system, add_generation_prompt=True),
        tokenizer("Plain prose.")["input_ids"],
    ]
    assert tokenizer.decode(_rows(theirs)[0]).endswith("Follow the bricks.<|im_end|>\n<|im_start|>assistant\n")
    assert _rows(ours)[0] == rendered(whole) and _rows(ours)[2] == _rows(theirs)[2]  # plain text: same either way
    one_turn = _write_jsonl(tmp_path / "one.jsonl", [{"conversations": [{"from": "human", "value": "alone"}]}])
    with pytest.raises(
        QuantbenchError, match=r"one\.jsonl record 1: the angelslim format needs two 'conversations' turns"
    ):
        tokenize_calibration(tokenizer, one_turn, 1, 64, stream=StreamSpec(format="angelslim"))


@pytest.mark.parametrize("side", ["right", "left"])
def test_max_length_padding_pads_every_sample_and_counts_the_pads(tmp_path, tokenizer, side):
    path = _write_jsonl(tmp_path / "texts.jsonl", [{"text": "word " * n} for n in (3, 9, 5)])
    tokenizer.padding_side = side
    try:
        longest = tokenize_calibration(tokenizer, path, 3, 40, stream=StreamSpec(selection="first-n"))
        unmasked = tokenize_calibration(
            tokenizer, path, 3, 40, stream=StreamSpec(selection="first-n", padding="max-length-unmasked")
        )
        masked = tokenize_calibration(
            tokenizer, path, 3, 40, stream=StreamSpec(selection="first-n", padding="max-length-masked")
        )
    finally:
        tokenizer.padding_side = "right"
    lengths = [len(r) for r in _rows(longest)]
    assert longest.input_ids.shape == (3, max(lengths)) and longest.num_tokens == sum(lengths)
    assert longest.attention_mask[:, 0].all()  # quantbench's padding is always on the right
    for padded in (unmasked, masked):
        assert padded.input_ids.shape == (3, 40) and _rows(padded) == _rows(longest)
        assert padded.num_tokens == 120 and padded.statistics_mask(0, 3).all()
        pads = padded.input_ids[~padded.attention_mask.bool()]
        assert (pads == tokenizer.pad_token_id).all() and pads.numel() == 120 - sum(lengths)
        real_first = bool(padded.attention_mask[:, 0].all())
        assert real_first == (side == "right") and bool(padded.attention_mask[:, -1].all()) == (side == "left")
    assert "attention_mask" not in unmasked.model_inputs(0, 3, "cpu")  # forwarded without a mask
    assert torch.equal(masked.model_inputs(0, 3, "cpu")["attention_mask"], masked.attention_mask)
    assert torch.equal(longest.statistics_mask(0, 3), longest.attention_mask.bool())


def test_the_stream_is_saved_with_the_samples(tmp_path, tokenizer, sharegpt_file):
    data = sharegpt_file
    calibration = tokenize_calibration(tokenizer, data, 4, 128, stream=ANGELSLIM)
    loaded = load_calibration(save_calibration(calibration, tmp_path / "c.safetensors"))
    assert loaded.stream == ANGELSLIM and loaded.num_tokens == 4 * 128
    assert {k: loaded.metadata[k] for k in ("selection", "format", "padding", "seed")} == {
        "selection": "first-n",
        "format": "angelslim",
        "padding": "max-length-unmasked",
        "seed": 0,
    }
    assert "attention_mask" not in loaded.model_inputs(0, 2, "cpu")
    old = tmp_path / "old.safetensors"  # written before streams were recorded: quantbench's stream
    plain = tokenize_calibration(tokenizer, data, 2, 64)
    save_calibration(
        type(plain)(
            plain.input_ids,
            plain.attention_mask,
            {k: v for k, v in plain.metadata.items() if k not in ("selection", "format", "padding")},
        ),
        old,
    )
    assert load_calibration(old).stream == StreamSpec()


def _config(**changes) -> dict:
    config = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        config[key] = value
    return config


def test_a_model_names_a_calibration_set_per_scheme():
    sets = {
        "short": {"path": "resources/calib/gutenberg_heldout_demo.jsonl", "num_samples": 8, "max_seq_len": 128},
        "long": {
            "path": "resources/calib/gutenberg_heldout_demo.jsonl",
            "num_samples": 4,
            "max_seq_len": 256,
            "selection": "first-n",
            "format": "angelslim",
            "padding": "max-length-unmasked",
        },
    }
    model = dict(
        CONFIG["models"]["tinyqwen3-dense"],
        calibration={"FP8-Static": "long", "INT4-GPTQ": "short", "INT4-AWQ": "short"},
    )
    config = _config(calibration_sets=sets, models={"tinyqwen3-dense": model})
    jsonschema.validate(config, SCHEMA)
    run = load_run_config(config, base_dir=REPO)
    assert run.calibration_of("tinyqwen3-dense", "FP8-Static").stream == StreamSpec(
        "first-n", "angelslim", "max-length-unmasked"
    )
    assert (
        run.calibration_of("tinyqwen3-dense", "INT4-GPTQ").name == "short"
        and run.calibration_of("tinyqwen3-dense", "FP8-Dynamic") is None
    )
    del model["calibration"]["INT4-AWQ"]
    with pytest.raises(
        QuantbenchError, match=r"models\.tinyqwen3-dense\.calibration: schemes \['INT4-AWQ'\] need calibration data"
    ):
        load_run_config(config, base_dir=REPO)
    model["calibration"].update({"INT4-AWQ": "short", "INT4-RTN": "short"})
    with pytest.raises(QuantbenchError, match=r"unknown scheme 'INT4-RTN'"):
        load_run_config(config, base_dir=REPO)
    model["calibration"] = {"FP8-Static": "long", "INT4-GPTQ": "nowhere", "INT4-AWQ": "short"}
    with pytest.raises(QuantbenchError, match=r"unknown calibration set 'nowhere'"):
        load_run_config(config, base_dir=REPO)


def test_stream_values_and_scheme_overrides_are_checked():
    bad = _config(
        calibration_sets={"g": {"path": "resources/calib/gutenberg_heldout_demo.jsonl", "padding": "max-length"}}
    )
    with pytest.raises(jsonschema.ValidationError, match="'max-length' is not one of"):
        jsonschema.validate(bad, SCHEMA)
    bad["models"]["tinyqwen3-dense"]["calibration"] = "g"
    with pytest.raises(
        QuantbenchError, match=r"calibration_sets\.g: calibration padding 'max-length' is not one of longest, "
    ):
        load_run_config(bad, base_dir=REPO)
    overrides = {"INT4-GPTQ": {"gptq": {"dead_columns": "zero"}}, "FP8-Static": {"calibration": {"experts": "routed"}}}
    run = load_run_config(_config(scheme_overrides=overrides), base_dir=REPO)
    default = load_run_config(CONFIG, base_dir=REPO)
    gptq, fp8 = run.schemes["INT4-GPTQ"], run.schemes["FP8-Static"]
    assert (
        gptq.params.dead_columns == "zero" and gptq.params.dampening == 0.01 and gptq.params.damping_retry == "multiply"
    )
    assert fp8.calibration.experts == "routed" and fp8.calibration.propagation == "quantized"
    assert {n: s for n, s in run.schemes.items() if n not in overrides} == {
        n: s for n, s in default.schemes.items() if n not in overrides
    }
    for overrides, message in [
        (
            {"INT4-GPTQ": {"gptq": {"dead_columns": "drop"}}},
            r"scheme 'INT4-GPTQ'\.gptq: dead_columns must be one of \('round', 'zero'\)",
        ),
        (
            {"FP8-Dynamic": {"calibration": {"experts": "routed"}}},
            r"scheme 'FP8-Dynamic'\.calibration: the scheme uses no calibration data",
        ),
        ({"FP9": {"algorithm": "rtn"}}, r"scheme_overrides: unknown scheme 'FP9'"),
    ]:
        with pytest.raises(QuantbenchError, match=message):
            load_run_config(_config(scheme_overrides=overrides), base_dir=REPO)


def test_chartqa_test_as_published_first_records_answer_then_generation_prompt_padded(tmp_path, monkeypatch):
    """The published Qwen2.5-VL calibration: ChartQA's test split (the split ChartQA_TEST scores), its first records in
    order, the answer turn followed by the generation prompt, padded to max_seq_len with every position counted."""
    import datasets

    from quantbench.calibration.hubsets import HubImageSet
    from quantbench.calibration.samples import process_image_calibration
    from vlm_fixtures import tiny_processor, write_benchmark_fixtures

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    jsonl = write_benchmark_fixtures(tmp_path / "files")["chartqa"]  # ChartQA test-style records
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    rows = datasets.Dataset.from_dict(
        {
            "image": [str(jsonl.parent / r["image"]) for r in records],
            "query": [r["question"] for r in records],
            "label": [[r["answer"]] for r in records],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "query": datasets.Value("string"),
                "label": datasets.List(datasets.Value("string")),
            }
        ),
    )
    (tmp_path / "ChartQA" / "data").mkdir(parents=True)
    rows.to_parquet(str(tmp_path / "ChartQA" / "data" / "test-00000-of-00001.parquet"))
    hub = HubImageSet.from_dict(
        {
            "dataset": str(tmp_path / "ChartQA"),
            "split": "test",
            "image": "image",
            "question": "query",
            "answer": "label",
        }
    )
    processor = tiny_processor()
    stream = StreamSpec(selection="first-n", format="angelslim", padding="max-length-masked")
    published = process_image_calibration(processor, hub, 3, 256, stream=stream)
    ours = process_image_calibration(processor, jsonl, 3, 256, stream=StreamSpec(selection="first-n"))
    texts = [
        processor.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(published.input_ids, published.attention_mask)
    ]
    for text, ours_row, record in zip(texts, _rows(ours), records[:3]):  # the first three records, in order
        assert text.endswith(f"{record['answer']}<|im_end|>\n<|im_start|>assistant\n") and record["question"] in text
        assert text == processor.tokenizer.decode(ours_row) + "<|im_start|>assistant\n"
    assert published.input_ids.shape == (3, 256) and published.num_tokens == 3 * 256
    assert torch.equal(published.model_inputs(0, 3, "cpu")["attention_mask"], published.attention_mask)
    assert (
        torch.equal(published.pixel_values, ours.pixel_values) and published.metadata["source_hub"]["split"] == "test"
    )

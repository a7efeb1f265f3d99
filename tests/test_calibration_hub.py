"""Image-text calibration from a Hugging Face dataset split: same samples as the JSONL form, config checks, rule inputs.

The Hub download itself is the one thing this machine cannot do, so the dataset is a local folder of parquet
files (written with datasets' Image feature from the fixture images) that ``datasets.load_dataset`` reads
through the same call the calibrate job makes with a Hub id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import jsonschema
import pytest
import torch
import yaml
from PIL import Image

from quantbench.calibration.hubsets import HubImageSet, hub_image_records
from quantbench.calibration.samples import (
    calibrate_model,
    load_calibration,
    process_image_calibration,
    save_calibration,
)
from quantbench.run.config import load_run_config
from quantbench.util.errors import QuantbenchError
from vlm_fixtures import save_tiny_vlm, tiny_processor, write_benchmark_fixtures

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
COLUMNS = {"image": "image", "question": "query", "answer": "label"}  # ChartQA's column names


def write_hub_folder(jsonl: Path, folder: Path) -> Path:
    """The records of an image-text JSONL as a dataset folder in ChartQA's layout (data/train-*.parquet).

    ``label`` is a list whose first entry is the JSONL's answer, followed by a decoy that must not be used.
    """
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "query": datasets.Value("string"),
            "label": datasets.List(datasets.Value("string")),
            "human_or_machine": datasets.Value("int64"),
        }
    )
    rows = datasets.Dataset.from_dict(
        {
            "image": [str(jsonl.parent / r["image"]) for r in records],
            "query": [r["question"] for r in records],
            "label": [[r["answer"], "decoy"] for r in records],
            "human_or_machine": [0] * len(records),
        },
        features=features,
    )
    (folder / "data").mkdir(parents=True)
    rows.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """The fixture ChartQA train split as a JSONL with images and as a dataset folder, and a saved tiny processor."""
    root = tmp_path_factory.mktemp("hubsets")
    jsonl = write_benchmark_fixtures(root / "files")["chartqa_train"]
    model = root / "tiny-vlm-processor"
    tiny_processor().save_pretrained(model)
    return {"jsonl": jsonl, "hub": write_hub_folder(jsonl, root / "ChartQA"), "model": model, "root": root}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache of loaded splits in the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def hub_set(folder: Path, **changes: str) -> HubImageSet:
    return HubImageSet.from_dict({"dataset": str(folder), "split": "train", **COLUMNS, **changes})


def test_hub_split_calibrates_exactly_like_the_jsonl_with_images(sets):
    processor = tiny_processor()
    from_jsonl = process_image_calibration(processor, sets["jsonl"], 3, 256, seed=1)
    from_hub = process_image_calibration(processor, hub_set(sets["hub"]), 3, 256, seed=1)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "images_per_sample"):
        assert torch.equal(getattr(from_hub, key), getattr(from_jsonl, key)), key
    # 3 samples of one 112x84 chart each: 6x8 patches of 14 px (t=1), 48 per image, each 3x2x14x14 = 1176 values
    assert from_hub.images_per_sample.tolist() == [1, 1, 1]
    assert from_hub.image_grid_thw.tolist() == [[1, 6, 8]] * 3
    assert tuple(from_hub.pixel_values.shape) == (144, 1176)
    assert from_hub.num_tokens == from_jsonl.num_tokens == int(from_hub.attention_mask.sum())
    texts = [
        processor.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(from_hub.input_ids, from_hub.attention_mask)
    ]
    assert all("decoy" not in text for text in texts) and sum(text.count("<|image_pad|>") for text in texts) == 144 // 4
    assert from_hub.metadata["source_hub"] == {"dataset": str(sets["hub"]), "split": "train", **COLUMNS}
    assert "source_sha256" not in from_hub.metadata and from_jsonl.metadata["source"] == "train.jsonl"


def test_calibrate_model_reads_a_hub_set_and_saves_what_the_jsonl_saves(sets, tmp_path):
    via_hub = save_calibration(
        calibrate_model(sets["model"], hub_set(sets["hub"]), 4, 256, seed=0), tmp_path / "hub.safetensors"
    )
    via_jsonl = save_calibration(
        calibrate_model(sets["model"], sets["jsonl"], 4, 256, seed=0), tmp_path / "jsonl.safetensors"
    )
    hub, jsonl = load_calibration(via_hub), load_calibration(via_jsonl)
    assert hub.has_images and hub.num_samples == 4 and hub.image_grid_thw.shape == (4, 3)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "images_per_sample"):
        assert torch.equal(getattr(hub, key), getattr(jsonl, key)), key
    assert hub.metadata["source"] == f"{sets['hub']}@main:train" and hub.metadata["images"] == 4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"question": "question"},
            r"has no column question: 'question'; its columns are \['image', 'query', 'label', 'human_or_machine'\]",
        ),
        ({"image": "query"}, r"column 'query' holds Value\('string'\), not images"),
        ({"split": "test"}, r"could not be loaded: Unknown split \"test\""),
    ],
    ids=["missing-column", "not-images", "unknown-split"],
)
def test_hub_set_errors_name_the_column_or_split(sets, changes, message):
    with pytest.raises(QuantbenchError, match=message):
        hub_image_records(hub_set(sets["hub"], **changes))


def config_with(calibration_set: dict) -> dict:
    config = json.loads(json.dumps(CONFIG))
    config["calibration_sets"]["chart"] = calibration_set
    return config


@pytest.mark.parametrize(
    ("calibration_set", "message"),
    [
        (
            {
                "path": "resources/calib/gutenberg_heldout_demo.jsonl",
                "hub": {"dataset": "d", "split": "train", **COLUMNS},
            },
            r"calibration_sets\.chart: give exactly one source, 'path: <JSONL>' or 'hub: \{dataset",
        ),
        ({"num_samples": 4}, r"calibration_sets\.chart: give exactly one source"),
        (
            {"hub": {"dataset": "HuggingFaceM4/ChartQA", "split": "train", "image": "image", "answer": "label"}},
            r"calibration_sets\.chart\.hub: missing 'question'; give dataset, split and the dataset's column names",
        ),
    ],
    ids=["path-and-hub", "neither", "missing-column"],
)
def test_config_names_a_bad_calibration_source(calibration_set, message):
    config = config_with(calibration_set)
    jsonschema.validate(config, SCHEMA)  # shapes are fine: these are the run config's checks, with their clear messages
    with pytest.raises(QuantbenchError, match=message):
        load_run_config(config, base_dir=REPO)


def test_config_reads_hub_sets_and_the_images_of_jsonl_sets(sets, tmp_path):
    hub = {
        "dataset": "HuggingFaceM4/ChartQA",
        "split": "train",
        "revision": "b605b6e08b57faf4359aeb2fe6a3ca595f99b6c5",
        **COLUMNS,
    }
    run = load_run_config(config_with({"hub": hub, "num_samples": 8}), base_dir=REPO)
    chart = run.calibration_sets["chart"]
    assert chart.source == HubImageSet(**hub) and chart.path is None and chart.images == () and chart.num_samples == 8
    assert chart.hub.to_dict() == hub
    with pytest.raises(jsonschema.ValidationError, match="'colum' was unexpected"):
        jsonschema.validate(config_with({"hub": {**hub, "colum": "x"}}), SCHEMA)
    run = load_run_config(config_with({"path": str(sets["jsonl"])}), base_dir=REPO)
    images = sets["jsonl"].parent / "images"
    assert run.calibration_sets["chart"].images == (images / "chart2.png", images / "chart3.png")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"image": "nowhere.png", "question": "?"}) + "\n", encoding="utf-8")
    with pytest.raises(
        QuantbenchError,
        match=r"calibration_sets\.chart\.path: .*broken\.jsonl names image\(s\) that do not exist: .*nowhere\.png",
    ):
        load_run_config(config_with({"path": str(broken)}), base_dir=REPO)


def snakemake(wd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_CACHE": str(wd / "hf-datasets"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(wd),
            "--configfile",
            str(wd / "run.yaml"),
            "--cores",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.workflow
def test_calibrate_rule_reads_a_hub_set_and_reruns_when_its_inputs_change(sets, tmp_path):
    """One real calibrate job per source; then an edited image, or another Hub identity, replans calibration."""
    model = save_tiny_vlm(tmp_path / "tiny-vlm")  # the download rule checks the weights it copies
    for name in ("config", "resources"):
        (tmp_path / name).symlink_to(REPO / name)
    files = tmp_path / "files"
    shutil.copytree(sets["jsonl"].parent, files)
    config = json.loads(json.dumps(CONFIG))
    config["calibration_sets"] = {
        "chart-hub": {
            "hub": {"dataset": str(sets["hub"]), "split": "train", **COLUMNS},
            "num_samples": 2,
            "max_seq_len": 256,
        },
        "chart-jsonl": {"path": str(files / "train.jsonl"), "num_samples": 2, "max_seq_len": 256},
        **config["calibration_sets"],
    }
    config["models"]["tiny-vlm"] = {"path": str(model), "schemes": ["BF16"], "params_b": 0.001}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    targets = ["results/calib/tiny-vlm/chart-hub.safetensors", "results/calib/tiny-vlm/chart-jsonl.safetensors"]
    snakemake(tmp_path, *targets)
    hub, jsonl = (load_calibration(tmp_path / target) for target in targets)
    assert hub.metadata["source_hub"]["dataset"] == str(sets["hub"]) and hub.num_samples == jsonl.num_samples == 2
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "images_per_sample"):
        assert torch.equal(getattr(hub, key), getattr(jsonl, key)), key
    assert "Nothing to be done" in snakemake(tmp_path, "--dry-run", *targets).stdout

    with Image.open(files / "images" / "chart3.png") as image:  # an edited image: its JSONL set calibrates again
        edited = image.copy()
    edited.putpixel((0, 0), (255, 0, 0))
    edited.save(files / "images" / "chart3.png")
    config["calibration_sets"]["chart-hub"]["hub"]["question"] = "label"  # another column: the Hub set does too
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    replanned = snakemake(tmp_path, "--dry-run", *targets).stdout
    reasons = dict(
        re.findall(r"output: results/calib/tiny-vlm/(\S+)\.safetensors\n(?:    .*\n)*?    reason: (.*)", replanned)
    )
    assert (
        reasons["chart-hub"].startswith("Params have changed since last execution")
        and "'question': 'label'" in reasons["chart-hub"]
    )
    assert reasons["chart-jsonl"] == f"Updated input files: {files / 'images' / 'chart3.png'}", replanned
    images = ", ".join(str(files / "images" / name) for name in ("chart2.png", "chart3.png"))
    assert f"input: results/models/tiny-vlm, {files / 'train.jsonl'}, {images}\n" in replanned

"""Every VLM scheme of the page on a tiny random-init Qwen2.5-VL: quantize, export, load back and answer.

Calibration is 4 generated bar charts with questions (ChartQA style, a train split) through the
model's processor. The non-ViT schemes must leave every vision tensor bit-identical; the -ViT schemes
quantize every vision block linear and leave the patch embedding, the merger, the embeddings and
lm_head in BF16. FP8-Static-ViT's vision input scales come from the images' activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quantbench.calibration.samples import Calibration, load_calibration, process_image_calibration
from quantbench.checkpoint.load import load_model
from quantbench.cli import main
from quantbench.model.vlm import image_text_inputs, load_processor, read_image_records
from quantbench.quant.linear import QuantLinear
from quantbench.quant.quantize import quantize_checkpoint, quantize_model
from quantbench.quant.schemes import load_schemes
from quantbench.quant.sequential import PipelineOptions, capture_packed_inputs
from quantbench.util.errors import QuantbenchError
from vlm_fixtures import save_tiny_vlm, write_benchmark_fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMES = load_schemes(Path(__file__).resolve().parents[1] / "config" / "schemes.yaml")
BF16_VISION = ["FP8-Static", "FP8-Dynamic", "INT4-GPTQ", "INT4-AWQ"]
VIT = ["FP8-Static-ViT", "FP8-Dynamic-ViT", "INT8-Dynamic-ViT"]
VISION_TENSORS = 30  # patch embed 1 + 2 blocks x (2 norms + 5 linears' weight and bias) + merger (norm + 2 linears) 5
VISION_LINEARS = 10  # 2 blocks x qkv, proj, gate, up, down
LANGUAGE_LINEARS = 14  # 2 layers x q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("vlm")
    model_dir = save_tiny_vlm(root / "model")
    files = write_benchmark_fixtures(root / "data")
    calib_file = root / "calib.safetensors"  # the CLI picks the processor for image-text records
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(model_dir),
                "--data",
                str(files["chartqa_train"]),
                "--out",
                str(calib_file),
                "--num-samples",
                "4",
                "--max-seq-len",
                "256",
            ]
        )
        == 0
    )
    processor = load_processor(model_dir)
    original, _ = load_model(model_dir)
    record = read_image_records(files["chartqa"])[0]
    inputs = image_text_inputs(processor, record["image"], record["question"])
    with torch.no_grad():
        logits = original(**inputs).logits[0, -1].float()
    return {
        "root": root,
        "model_dir": model_dir,
        "calib": calib_file,
        "original": original.state_dict(),
        "inputs": inputs,
        "logits": logits,
        "model": original,
        "processor": processor,
        "files": files,
    }


def test_image_calibration_round_trips_with_its_images(vlm: dict) -> None:
    calibration = load_calibration(vlm["calib"])
    assert calibration.has_images and calibration.num_samples == 4
    # 84x112-pixel charts: 6x8 patches of 14 pixels, 12 image tokens after the 2x2 merge
    assert calibration.image_grid_thw.tolist() == [[1, 6, 8]] * 4 and calibration.pixel_values.shape == (192, 1176)
    image_token = load_processor(vlm["model_dir"]).image_token_id
    assert ((calibration.input_ids == image_token).sum(dim=1) == 12).all()
    chunk = calibration.model_inputs(1, 3, "cpu")
    assert chunk["pixel_values"].shape == (96, 1176) and torch.equal(
        chunk["pixel_values"], calibration.pixel_values[48:144]
    )
    metadata = json.loads(json.dumps(calibration.metadata))
    assert metadata["images"] == 4 and metadata["source"] == "train.jsonl"


def test_image_records_are_cut_only_after_their_image_tokens(vlm: dict) -> None:
    # each chart sample: 12 image tokens, the last at position 18; the longest sample is 60 tokens
    full = process_image_calibration(vlm["processor"], vlm["files"]["chartqa_train"], 4, 256)
    cut = process_image_calibration(vlm["processor"], vlm["files"]["chartqa_train"], 4, 19)
    assert full.input_ids.shape == (4, 60) and cut.input_ids.shape == (4, 19)
    assert torch.equal(cut.input_ids, full.input_ids[:, :19]) and torch.equal(cut.pixel_values, full.pixel_values)
    with pytest.raises(QuantbenchError, match="only 0 usable records"):
        process_image_calibration(vlm["processor"], vlm["files"]["chartqa_train"], 4, 18)


def _kinds(model: nn.Module, prefix: str) -> tuple[int, int]:
    modules = [m for n, m in model.named_modules() if n.startswith(prefix)]
    return sum(isinstance(m, QuantLinear) for m in modules), sum(type(m) is nn.Linear for m in modules)


def _identical(state: dict[str, torch.Tensor], original: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> int:
    """How many tensors under ``prefixes`` exist in both and are bit-identical; fails on any that differs."""
    names = [n for n in original if n.startswith(prefixes)]
    differing = [
        n for n in names if n not in state or not torch.equal(state[n].view(torch.uint8), original[n].view(torch.uint8))
    ]
    assert differing == []
    return len(names)


@pytest.mark.parametrize("name", BF16_VISION + VIT)
def test_every_vlm_scheme_quantizes_exports_loads_and_answers(name: str, vlm: dict) -> None:
    out = quantize_checkpoint(
        vlm["model_dir"], SCHEMES[name], vlm["root"] / "q" / name, calibration=vlm["calib"], device="cpu"
    )
    model, _ = load_model(out)
    state = model.state_dict()
    assert _kinds(model, "model.language_model.") == (LANGUAGE_LINEARS, 0)
    if name in VIT:
        assert _kinds(model, "model.visual.blocks.") == (VISION_LINEARS, 0)
        assert _kinds(model, "model.visual.merger.") == (0, 2)
        kept = ("model.visual.patch_embed.", "model.visual.merger.", "model.language_model.embed_tokens.", "lm_head.")
        assert _identical(state, vlm["original"], kept) == 1 + 5 + 1 + 1
    else:
        assert _kinds(model, "model.visual.") == (0, 2 * 5 + 2)
        assert _identical(state, vlm["original"], ("model.visual.",)) == VISION_TENSORS

    provenance = json.loads((out / "quantbench_provenance.json").read_text(encoding="utf-8"))
    if SCHEMES[name].needs_calibration:  # the language layers calibrated on the 4 chat samples, image tokens included
        assert provenance["calibration"]["images"] == 4
        assert provenance["quantization"]["calibration_tokens"] == int(
            load_calibration(vlm["calib"]).attention_mask.sum()
        )

    processor = load_processor(out)  # the checkpoint carries the processor
    inputs = vlm["inputs"]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
        answer = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    rel = float((logits - vlm["logits"]).norm() / vlm["logits"].norm())
    assert 0 < rel < 0.25, rel
    assert answer.shape[1] == inputs["input_ids"].shape[1] + 4
    assert processor.batch_decode(answer[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def test_fp8_static_vit_input_scales_come_from_the_images(vlm: dict) -> None:
    """Block 0's qkv sees the unquantized patch embedding's output: its scale is absmax / 448 over the calibration patches."""
    calibration = load_calibration(vlm["calib"])
    seen: list[torch.Tensor] = []
    original = vlm["model"]
    handle = original.model.visual.blocks[0].attn.qkv.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        original(**calibration.model_inputs(0, 4, "cpu"))
    handle.remove()
    assert seen[0].shape == (192, 64)
    model, _ = load_model(vlm["root"] / "q" / "FP8-Static-ViT")
    scale = model.model.visual.blocks[0].attn.qkv.input_scale
    assert float(scale) == pytest.approx(float(seen[0].abs().max().float()) / 448, rel=1e-6)
    scales = [
        m.input_scale
        for n, m in model.named_modules()
        if n.startswith("model.visual.blocks.") and isinstance(m, QuantLinear)
    ]
    assert len(scales) == VISION_LINEARS and all(float(s) > 0 and float(s) != 1.0 for s in scales)


def test_static_vit_schemes_refuse_text_only_calibration(vlm: dict) -> None:
    model, _ = load_model(vlm["model_dir"])
    text_only = Calibration(
        torch.randint(7, 100, (2, 16), generator=torch.Generator().manual_seed(0)),
        torch.ones(2, 16, dtype=torch.int64),
        {},
    )
    with pytest.raises(QuantbenchError, match="vision blocks, but the calibration set has no images"):
        quantize_model(model, SCHEMES["FP8-Static-ViT"], text_only, device="cpu")


def test_vision_capture_records_each_blocks_attention_spans(vlm: dict) -> None:
    """Block 0 attends in windows, block 1 (fullatt_block_indexes) over whole images: each gets its own cu_seqlens."""
    model, _ = load_model(vlm["model_dir"])
    calibration = load_calibration(vlm["calib"])
    blocks = model.model.visual.blocks
    calls, per_block = capture_packed_inputs(
        model,
        blocks,
        calibration,
        torch.device("cpu"),
        PipelineOptions(chunk_size=2),
        keep_away=[model.model.language_model.layers],
    )
    assert len(calls) == 2 and [c.args[0].shape for c in calls] == [(96, 64), (96, 64)] and calls[0].mask.all()
    assert per_block[1][0]["cu_seqlens"].tolist() == [0, 48, 96]  # two images of 48 patches
    windows = per_block[0][0]["cu_seqlens"]
    assert windows[-1] == 96 and len(windows) > 3  # 112-pixel windows: several per image
    # the rotary tables are one tensor shared by both blocks' arguments
    assert per_block[0][1]["position_embeddings"][0] is per_block[1][1]["position_embeddings"][0]


def test_docvqa_style_records_calibrate_on_their_first_answer(vlm: dict) -> None:
    calibration = process_image_calibration(vlm["processor"], vlm["files"]["docvqa"], 3, 256)
    tokenizer = vlm["processor"].tokenizer
    texts = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(calibration.input_ids, calibration.attention_mask)]
    answers = sorted(text.rsplit("<|im_start|>assistant\n", 1)[1] for text in texts)
    assert answers == ["12B<|im_end|>\n", "17.50<|im_end|>\n", "5<|im_end|>\n"]

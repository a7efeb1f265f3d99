"""Offline vision-language fixtures: a tiny random-init Qwen2.5-VL with its processor, and generated images with questions.

The tokenizer is character-level over printable ASCII plus Qwen's chat and vision special tokens; the
image processor makes 28x28-pixel merge units, at most 16 of them per image, so every image is a few
dozen patches. Images are drawn with PIL: bar charts with their values written on the bars (ChartQA
style), text boxes (DocVQA style) and coloured shapes with options (MMMU style).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)

from quantbench.model.vlm import image_only_processor_class

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# vision: 2 blocks (block 1 full attention, block 0 windowed), 4 linears each in 4 groups (qkv, proj, gate/up, down)
# language: 2 layers of width 128 (INT4 groups of 128 divide every input), 7 linears each
VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=128,
    fullatt_block_indexes=[1],
    window_size=56,
)
TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
    bos_token_id=None,
)


def tiny_processor() -> Qwen2_5_VLProcessor:
    """Character tokenizer + small-image processor + chat template, built in code."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(string.printable))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(SPECIAL)
    backend.decoder = decoders.Fuse()  # characters back to text with no separator
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16})
    return image_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def tiny_qwen2_5_vl(processor: Qwen2_5_VLProcessor, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A random-init Qwen2.5-VL (bf16) whose special token ids are the processor's."""
    tokenizer = processor.tokenizer
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=dict(
            TEXT, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        ),
        vision_config=VISION,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_vlm(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny model and its processor as a Hugging Face model directory."""
    processor = tiny_processor()
    model = tiny_qwen2_5_vl(processor, seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _bar_chart(values: list[int], labels: list[str]) -> Image.Image:
    image = Image.new("RGB", (112, 84), "white")
    draw = ImageDraw.Draw(image)
    width = 100 // len(values)
    for i, (value, label) in enumerate(zip(values, labels)):
        left = 6 + i * width
        draw.rectangle([left, 70 - value // 2, left + width - 6, 70], fill=(40 + 60 * i, 90, 200 - 50 * i))
        draw.text((left, 58 - value // 2), str(value), fill="black")
        draw.text((left, 72), label, fill="black")
    return image


def _text_box(lines: list[str]) -> Image.Image:
    image = Image.new("RGB", (112, 84), (250, 248, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle([2, 2, 109, 81], outline="black")
    for i, line in enumerate(lines):
        draw.text((6, 6 + 14 * i), line, fill="black")
    return image


def _shapes(colour: str, shape: str) -> Image.Image:
    image = Image.new("RGB", (84, 84), "white")
    draw = ImageDraw.Draw(image)
    box = [14, 14, 70, 70]
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return image


def write_benchmark_fixtures(root: Path) -> dict[str, Path]:
    """Images and JSONL files in the style of ChartQA (test), DocVQA (val), MMMU (val) and a ChartQA train calibration split."""
    chart = root / "chartqa"
    doc = root / "docvqa"
    mmmu = root / "mmmu"
    for folder in (chart / "images", doc / "images", mmmu / "images"):
        folder.mkdir(parents=True, exist_ok=True)

    charts = [
        ([30, 60, 90], ["a", "b", "c"]),
        ([80, 20, 50], ["x", "y", "z"]),
        ([10, 40], ["p", "q"]),
        ([70, 35, 55], ["u", "v", "w"]),
    ]
    test_rows, train_rows = [], []
    for i, (values, labels) in enumerate(charts):
        name = f"images/chart{i}.png"
        _bar_chart(values, labels).save(chart / name)
        top = labels[values.index(max(values))]
        rows = [
            {
                "image": name,
                "question": f"What is the value of {labels[0]}?",
                "answer": str(values[0]),
                "type": "human_test",
            },
            {"image": name, "question": "Which bar is highest?", "answer": top, "type": "augmented_test"},
        ]
        (train_rows if i >= 2 else test_rows).extend(rows)
    (chart / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows), encoding="utf-8")
    (chart / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows), encoding="utf-8")

    docs = [
        (["INVOICE 42", "Total: 17.50", "Date: 2024"], "What is the total?", ["17.50", "$17.50"]),
        (["Dear Ana,", "Room 12B", "Thanks"], "Which room?", ["12B", "room 12b"]),
        (["MENU", "Tea 2", "Cake 5"], "How much is the cake?", ["5"]),
    ]
    doc_rows = []
    for i, (lines, question, answers) in enumerate(docs):
        name = f"images/doc{i}.png"
        _text_box(lines).save(doc / name)
        doc_rows.append({"image": name, "question": question, "answers": answers, "question_id": i})
    (doc / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in doc_rows), encoding="utf-8")

    mmmu_rows = []
    for i, (colour, shape, answer) in enumerate(
        [("red", "circle", "A"), ("blue", "square", "C"), ("green", "circle", "B")]
    ):
        name = f"images/shape{i}.png"
        _shapes(colour, shape).save(mmmu / name)
        mmmu_rows.append(
            {
                "id": f"validation_Art_{i + 1}",
                "image": name,
                "question": "<image 1> What colour is the shape?",
                "options": ["red", "green", "blue", "black"] if i != 1 else ["red", "green", "blue"],
                "answer": "A" if colour == "red" else ("C" if colour == "blue" else "B"),
                "question_type": "multiple-choice",
            }
        )
        assert mmmu_rows[-1]["answer"] == answer
    mmmu_rows.append(
        {
            "id": "validation_Math_1",
            "image": "images/shape0.png",
            "question": "<image 1> How many circles?",
            "options": [],
            "answer": "1",
            "question_type": "open",
        }
    )
    (mmmu / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mmmu_rows), encoding="utf-8")
    return {
        "chartqa": chart / "test.jsonl",
        "chartqa_train": chart / "train.jsonl",
        "docvqa": doc / "val.jsonl",
        "mmmu": mmmu / "val.jsonl",
    }

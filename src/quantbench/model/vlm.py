"""Vision-language models: which configs are image-text models, their processor, and one image + question as model inputs.

Records of image-text data (calibration sets and the offline benchmark files) are JSON objects with
``image`` (a path relative to the JSONL file's folder) and ``question``; calibration records may carry
``answer``, which becomes the assistant's turn. The prompt is the model's chat template with one user
turn holding the image and the question, so calibration and evaluation see the tokens the model is
served with.

Without torchvision, transformers cannot build the video processor that processors like Qwen2.5-VL's
declare, and its AutoProcessor gives up on them; :func:`load_processor` then builds the same processor
class without its video part (images and text only, which is all quantbench feeds).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import transformers
from PIL import Image
from transformers import AutoProcessor, PretrainedConfig, ProcessorMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from quantbench.util.errors import QuantbenchError
from quantbench.util.jsonl import iter_jsonl

log = logging.getLogger(__name__)

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json")


def is_image_text_model(config: PretrainedConfig) -> bool:
    """Whether ``config`` describes a model that takes images and text (transformers' image-text-to-text class)."""
    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def image_only_processor_class(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of processor class ``cls`` (same name) built from an image processor and a tokenizer, no video processor."""

    def __init__(
        self: ProcessorMixin,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {"__init__": __init__, "__module__": __name__, "__doc__": f"{cls.__name__} for images and text only."},
    )


def _processor_class_name(path: Path) -> str:
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            found = json.loads((path / name).read_text(encoding="utf-8")).get("processor_class")
            if found:
                return found
    raise QuantbenchError(
        f"{path} holds no processor_config.json naming its processor_class; save the model's processor there"
    )


def load_processor(path: str | Path) -> ProcessorMixin:
    """The processor saved in ``path`` (image processor, tokenizer, chat template); see the module docstring."""
    path = Path(path)
    if not is_torchvision_available():
        name = _processor_class_name(path)
        cls = getattr(transformers, name, None)
        if cls is None:
            raise QuantbenchError(
                f"{path}: processor class {name!r} is not part of transformers {transformers.__version__}"
            )
        if "video_processor" in cls.get_attributes():
            log.debug("torchvision is absent: loading %s without its video processor", name)
            return image_only_processor_class(cls).from_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def read_image_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of an image-text JSONL file, each with ``image`` resolved to an existing file."""
    path = Path(path)
    records = []
    for lineno, record in iter_jsonl(path, "image-text file"):
        if "image" not in record or "question" not in record:
            raise QuantbenchError(f"{path}:{lineno}: expected an object with 'image' (a path) and 'question'")
        image = path.parent / record["image"]
        if not image.is_file():
            raise QuantbenchError(f"{path}:{lineno}: image {image} does not exist")
        records.append({**record, "image": image})
    return records


def image_text_inputs(
    processor: ProcessorMixin,
    image: str | Path | Image.Image,
    question: str,
    answer: str | None = None,
    *,
    add_generation_prompt: bool | None = None,
) -> dict[str, Any]:
    """Model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, batch of 1) of one prompt.

    ``image`` is an image file or an already decoded image (a Hugging Face dataset's rows).

    Without ``answer`` the prompt ends where the assistant starts (for generation); with it, the
    assistant's answer closes the conversation (for calibration). ``add_generation_prompt`` (default: only
    without an answer) appends the assistant's start after the chat; the published recipe's calibration
    appends it after the answer too.
    """
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": str(answer)}]})
    if add_generation_prompt is None:
        add_generation_prompt = answer is None
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
    else:
        with Image.open(image) as picture:
            rgb = picture.convert("RGB")
    inputs = processor(text=[text], images=[rgb], return_tensors="pt")
    return {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

"""Calibration data: read a JSONL of texts or chats, tokenize N samples x L tokens, save and load them.

Records are ``{"text": ...}``, ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT
``{"conversations": [{"from", "value"}, ...]}``. How they become samples is a
:class:`~quantbench.calibration.stream.StreamSpec`. By default (quantbench's stream) samples are chosen by a seeded
shuffle of the records; chats go through the tokenizer's chat template when it has one (otherwise their
contents are joined by blank lines); each sample is truncated to ``max_seq_len`` tokens and right-padded to
the longest chosen sample; the attention mask marks real tokens, and every statistic downstream counts only
those. The published recipe's stream (first N records, first ShareGPT pair with a generation prompt,
padded to ``max_seq_len``, pads in the statistics) is the spec's other values.

Image-text sets (vision-language models, :func:`process_image_calibration`; :func:`calibrate_model`
picks by the records) go through the model's processor: each record's image and question (and answer) as
one chat, truncated only after its last image token. They come from a JSONL with image files, or from a
split of a Hugging Face dataset (:class:`quantbench.calibration.hubsets.HubImageSet`); the same records give the same
samples either way. Their samples carry the images' patches too: ``pixel_values`` [patches, C] of every
image in sample order, ``image_grid_thw`` [images, 3] and ``images_per_sample`` [N], so any run of
samples (:meth:`Calibration.model_inputs`) has its own images.

The saved form is one safetensors file with ``input_ids`` and ``attention_mask`` ([N, L] int64, 1 = real
token), the image tensors when there are images, and metadata (the source file and its sha256, or the Hub
dataset, split, revision and columns; N, L, the stream spec, the tokenizer and its fingerprint) as one
key-sorted JSON string under ``METADATA_KEY``, so that the same samples always give the same bytes. The
stream's padding says what the model is given (:meth:`Calibration.model_inputs`) and which positions the
statistics count (:meth:`Calibration.statistics_mask`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from quantbench.calibration.hubsets import HubImageSet, hub_image_records
from quantbench.calibration.stream import StreamSpec
from quantbench.model.vlm import image_text_inputs, load_processor, read_image_records
from quantbench.util.errors import QuantbenchError
from quantbench.util.io import atomic_write_bytes
from quantbench.util.jsonl import iter_jsonl
from quantbench.util.provenance import sha256_file

log = logging.getLogger(__name__)

METADATA_KEY = "quantbench_calibration"

# ShareGPT speaker names -> chat-template roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


IMAGE_KEYS = ("pixel_values", "image_grid_thw", "images_per_sample")


@dataclass(frozen=True)
class Calibration:
    """Tokenized calibration samples: ``input_ids`` and ``attention_mask`` [N, L] (1 = real token), and their images if any."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    metadata: dict[str, Any]
    pixel_values: torch.Tensor | None = None  # [patches, C], every image's patches in sample order
    image_grid_thw: torch.Tensor | None = None  # [images, 3]: patches of image i = prod(row i)
    images_per_sample: torch.Tensor | None = None  # [N]

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.attention_mask.shape or self.input_ids.dim() != 2:
            raise ValueError("input_ids and attention_mask must both be [N, L]")
        images = [getattr(self, key) is not None for key in IMAGE_KEYS]
        if any(images) and not all(images):
            raise ValueError(f"image samples need all of {IMAGE_KEYS}")
        if all(images) and (
            self.images_per_sample.shape != (self.num_samples,)
            or int(self.images_per_sample.sum()) != self.image_grid_thw.shape[0]
            or int(self.image_grid_thw.prod(dim=1).sum()) != self.pixel_values.shape[0]
        ):
            raise ValueError("images_per_sample, image_grid_thw and pixel_values do not describe the same images")

    @property
    def has_images(self) -> bool:
        """Whether the samples carry images (an image-text calibration set)."""
        return self.pixel_values is not None

    @property
    def stream(self) -> StreamSpec:
        """How the samples were made (files written before streams were recorded: quantbench's default stream)."""
        return StreamSpec.from_dict(self.metadata, "calibration metadata")

    def model_inputs(self, start: int, stop: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The keyword inputs of a model forward for samples ``start:stop``, with their images, on ``device``.

        The attention mask is left out when the stream forwards without one (``max-length-unmasked``).
        """
        inputs = {"input_ids": self.input_ids[start:stop].to(device)}
        if self.stream.forward_mask:
            inputs["attention_mask"] = self.attention_mask[start:stop].to(device)
        if self.has_images:
            image_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.images_per_sample.cumsum(0)])
            first, last = int(image_offsets[start]), int(image_offsets[min(stop, self.num_samples)])
            patch_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.image_grid_thw.prod(dim=1).cumsum(0)])
            if last > first:
                inputs["pixel_values"] = self.pixel_values[int(patch_offsets[first]) : int(patch_offsets[last])].to(
                    device
                )
                inputs["image_grid_thw"] = self.image_grid_thw[first:last].to(device)
        return inputs

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return int(self.input_ids.shape[0])

    def statistics_mask(self, start: int, stop: int) -> torch.Tensor:
        """Which positions of samples ``start:stop`` the statistics count (bool [n, L]): the real tokens, or every
        position when the stream's pads count."""
        mask = self.attention_mask[start:stop].bool()
        return torch.ones_like(mask) if self.stream.pads_in_statistics else mask

    @property
    def num_tokens(self) -> int:
        """Positions the statistics count over all samples: the real tokens, or every position when pads count."""
        return int(self.statistics_mask(0, self.num_samples).sum())

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Fail clearly when these samples were tokenized by a different tokenizer."""
        recorded = self.metadata.get("tokenizer_sha256")
        if recorded is not None and recorded != tokenizer_fingerprint(tokenizer):
            raise QuantbenchError(
                f"calibration data from {self.metadata.get('source', '?')} was tokenized with another tokenizer "
                f"({self.metadata.get('tokenizer', '?')}); rerun `quantbench calibrate` with this model"
            )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), so calibration ids are tied to their tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def _messages(record: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    """The chat of a record as [{role, content}], or None for a plain-text record."""
    if "messages" in record:
        try:
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]
        except (KeyError, TypeError) as exc:
            raise QuantbenchError(f"{where}: 'messages' entries need 'role' and 'content' ({exc})") from None
    if "conversations" in record:
        chat = []
        for turn in record["conversations"]:
            speaker = str(turn.get("from", "")).lower() if isinstance(turn, dict) else ""
            if speaker not in SHAREGPT_ROLES or "value" not in turn:
                raise QuantbenchError(
                    f"{where}: a 'conversations' turn needs 'from' in {sorted(SHAREGPT_ROLES)} and 'value'"
                )
            chat.append({"role": SHAREGPT_ROLES[speaker], "content": str(turn["value"])})
        return chat
    return None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped), each checked to carry text or a chat."""
    records = []
    for lineno, record in iter_jsonl(path, "calibration file (a JSONL of texts or chats)"):
        if not {"text", "messages", "conversations"} & set(record):
            raise QuantbenchError(f"{path}:{lineno}: expected an object with 'text', 'messages' or 'conversations'")
        records.append(record)
    return records


def _token_ids(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], where: str) -> list[int]:
    """quantbench's format: the whole chat through the template, no generation prompt (see the module docstring)."""
    chat = _messages(record, where)
    if chat is None:
        return list(tokenizer(str(record["text"]))["input_ids"])
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n\n".join(turn["content"] for turn in chat))["input_ids"])


def _angelslim_chat(record: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    """The chat AngelSlim's ``TextDataset`` builds: a ``messages`` record whole (its ``system_prompt`` first),
    a ShareGPT record's first two turns as user and assistant whoever spoke them; None for a plain text."""
    if "conversations" in record:
        turns = record["conversations"]
        if (
            not isinstance(turns, list)
            or len(turns) < 2
            or not all(isinstance(t, dict) and "value" in t for t in turns[:2])
        ):
            raise QuantbenchError(
                f"{where}: the angelslim format needs two 'conversations' turns with a 'value' (a user/assistant pair)"
            )
        return [
            {"role": "user", "content": str(turns[0]["value"])},
            {"role": "assistant", "content": str(turns[1]["value"])},
        ]
    chat = _messages(record, where)
    if chat is not None and record.get("system_prompt") and chat[0]["role"] != "system":
        chat = [{"role": "system", "content": str(record["system_prompt"])}, *chat]
    return chat


def _angelslim_token_ids(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], where: str, max_seq_len: int
) -> list[int]:
    """The published recipe's format: :func:`_angelslim_chat` through the template with a generation prompt,
    tokenized with the tokenizer's default special tokens and truncation side (plain text: as it is)."""
    chat = _angelslim_chat(record, where)
    if chat is None:
        text = str(record["text"])
    elif not tokenizer.chat_template:
        raise QuantbenchError(
            f"{where}: the angelslim format renders chats through the chat template, and this tokenizer has none"
        )
    else:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, truncation=True, max_length=max_seq_len)["input_ids"])


def _record_order(count: int, stream: StreamSpec, seed: int) -> list[int]:
    """Record indices in the order samples are taken: file order (``first-n``) or shuffled with ``seed``."""
    order = list(range(count))
    if stream.selection == "shuffle":
        random.Random(seed).shuffle(order)
    return order


def tokenize_calibration(
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    num_samples: int,
    max_seq_len: int,
    *,
    seed: int = 0,
    stream: StreamSpec = StreamSpec(),
) -> Calibration:
    """Take ``num_samples`` records of ``path`` as ``stream`` says (``seed`` shuffles them) and tokenize them to
    at most ``max_seq_len`` tokens.

    Records that tokenize to nothing are skipped; too few usable records is an error.
    """
    if num_samples <= 0 or max_seq_len <= 0:
        raise QuantbenchError(f"num_samples and max_seq_len must be positive, got {num_samples} and {max_seq_len}")
    path = Path(path)
    records = read_records(path)
    samples: list[list[int]] = []
    for index in _record_order(len(records), stream, seed):
        where = f"{path} record {index + 1}"
        if stream.format == "angelslim":
            ids = _angelslim_token_ids(tokenizer, records[index], where, max_seq_len)
        else:
            ids = _token_ids(tokenizer, records[index], where)[:max_seq_len]
        if ids:
            samples.append(ids)
            if len(samples) == num_samples:
                break
    if len(samples) < num_samples:
        raise QuantbenchError(
            f"{path} has only {len(samples)} non-empty records, fewer than the {num_samples} samples asked for; "
            "lower num_samples or use a larger calibration file"
        )
    input_ids, attention_mask = _pad_samples(samples, tokenizer, stream, max_seq_len)
    return Calibration(input_ids, attention_mask, _metadata(path, tokenizer, num_samples, max_seq_len, seed, stream))


def _metadata(
    source: Path | HubImageSet,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    max_seq_len: int,
    seed: int,
    stream: StreamSpec,
) -> dict[str, Any]:
    """What made a calibration set: its source (file and hash, or Hub set), N, L, seed, the stream, the tokenizer and its fingerprint."""
    if isinstance(source, HubImageSet):
        origin: dict[str, Any] = {"source": source.describe(), "source_hub": source.to_dict()}
    else:
        origin = {"source": source.name, "source_sha256": sha256_file(source)}
    return {
        **origin,
        "num_samples": num_samples,
        "max_seq_len": max_seq_len,
        "seed": seed,
        **stream.to_dict(),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
    }


def _pad_samples(
    samples: list[list[int]], tokenizer: PreTrainedTokenizerBase, stream: StreamSpec, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` padded with the tokenizer's pad token, and the mask of real tokens.

    ``longest``: right-padded to the longest sample (pad id 0 when the tokenizer has none). The max-length
    paddings: every sample padded to ``max_seq_len`` on the tokenizer's padding side, as the tokenizer's own
    ``padding="max_length"`` does (a tokenizer without a pad token is an error, as it is there).
    """
    pad_id = tokenizer.pad_token_id
    if stream.padding == "longest":
        length, left = max(len(ids) for ids in samples), False
        pad_id = 0 if pad_id is None else pad_id
    else:
        if pad_id is None:
            raise QuantbenchError(
                f"padding {stream.padding!r} pads with the tokenizer's pad token, and {getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none"
            )
        length, left = max_seq_len, tokenizer.padding_side == "left"
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.int64)
    for row, ids in enumerate(samples):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def process_image_calibration(
    processor: Any,
    source: str | Path | HubImageSet,
    num_samples: int,
    max_seq_len: int,
    *,
    seed: int = 0,
    stream: StreamSpec = StreamSpec(),
) -> Calibration:
    """Take ``num_samples`` image-text records of ``source`` as ``stream`` says and run them through ``processor``.

    ``source`` is a JSONL of :func:`quantbench.model.vlm.read_image_records` objects (``image``, ``question``,
    optional ``answer`` or ``answers``, whose first one is used) or a Hub set, whose rows
    :func:`quantbench.calibration.hubsets.hub_image_records` gives in the same form. The ``angelslim`` format ends each
    chat with a generation prompt after the answer. A sample is cut to ``max_seq_len`` tokens only after its
    last image token; a record whose image tokens alone exceed ``max_seq_len`` is skipped (logged), and too
    few usable records is an error.
    """
    if num_samples <= 0 or max_seq_len <= 0:
        raise QuantbenchError(f"num_samples and max_seq_len must be positive, got {num_samples} and {max_seq_len}")
    if isinstance(source, HubImageSet):
        where, records = source.describe(), hub_image_records(source)
    else:
        source = Path(source)
        where, records = str(source), read_image_records(source)
    image_token = processor.image_token_id
    samples: list[list[int]] = []
    pixels, grids = [], []
    skipped = 0
    for index in _record_order(len(records), stream, seed):
        record = records[index]
        answer = record.get("answer", (record.get("answers") or [""])[0])  # DocVQA-style records: the first answer
        inputs = image_text_inputs(
            processor,
            record["image"],
            str(record["question"]),
            answer,
            add_generation_prompt=stream.format == "angelslim",
        )
        ids = inputs["input_ids"][0].tolist()
        image_end = max(i for i, token in enumerate(ids) if token == image_token) + 1
        if image_end > max_seq_len:
            skipped += 1
            continue
        samples.append(ids[:max_seq_len])
        pixels.append(inputs["pixel_values"])
        grids.append(inputs["image_grid_thw"])
        if len(samples) == num_samples:
            break
    if skipped:
        log.warning(
            "%s: %d record(s) skipped, their image tokens alone exceed max_seq_len=%d", where, skipped, max_seq_len
        )
    if len(samples) < num_samples:
        raise QuantbenchError(
            f"{where} has only {len(samples)} usable records (image tokens within max_seq_len={max_seq_len}), fewer than "
            f"the {num_samples} samples asked for; lower num_samples, raise max_seq_len or use a larger set"
        )
    tokenizer = processor.tokenizer
    input_ids, attention_mask = _pad_samples(samples, tokenizer, stream, max_seq_len)
    metadata = {**_metadata(source, tokenizer, num_samples, max_seq_len, seed, stream), "images": len(grids)}
    return Calibration(
        input_ids,
        attention_mask,
        metadata,
        pixel_values=torch.cat(pixels),
        image_grid_thw=torch.cat(grids).to(torch.int64),
        images_per_sample=torch.tensor([grid.shape[0] for grid in grids], dtype=torch.int64),
    )


def _holds_images(path: Path) -> bool:
    """Whether the first record of the JSONL ``path`` is an image-text record (has ``image``); reads no further."""
    _, first = next(iter_jsonl(path, "calibration file (a JSONL of texts, chats or image-text records)"))
    return "image" in first


def calibrate_model(
    model_dir: str | Path,
    source: str | Path | HubImageSet,
    num_samples: int,
    max_seq_len: int,
    *,
    seed: int = 0,
    stream: StreamSpec = StreamSpec(),
) -> Calibration:
    """Calibration samples of ``source`` (a JSONL, or a Hub image-text set) for the model in ``model_dir``.

    Image-text records go through the model's processor (:func:`process_image_calibration`), texts and
    chats through its tokenizer (:func:`tokenize_calibration`); ``stream`` says how records become samples.
    """
    if isinstance(source, HubImageSet) or _holds_images(Path(source)):
        return process_image_calibration(
            load_processor(model_dir), source, num_samples, max_seq_len, seed=seed, stream=stream
        )
    return tokenize_calibration(
        AutoTokenizer.from_pretrained(model_dir), source, num_samples, max_seq_len, seed=seed, stream=stream
    )


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    """Write ``calibration`` as one safetensors file, atomically."""
    tensors = {
        "input_ids": calibration.input_ids.contiguous(),
        "attention_mask": calibration.attention_mask.contiguous(),
    }
    if calibration.has_images:
        tensors.update((key, getattr(calibration, key).contiguous()) for key in IMAGE_KEYS)
    metadata = {METADATA_KEY: json.dumps(calibration.metadata, sort_keys=True, ensure_ascii=False)}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_calibration(path: str | Path) -> Calibration:
    """Read a file written by :func:`save_calibration`."""
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"calibration file {path} does not exist; create it with `quantbench calibrate`")
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
        metadata = json.loads(header[METADATA_KEY])
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a calibration file"
        raise QuantbenchError(f"{path} is not a calibration file written by `quantbench calibrate` ({exc!r})") from None
    if set(tensors) not in ({"input_ids", "attention_mask"}, {"input_ids", "attention_mask", *IMAGE_KEYS}):
        raise QuantbenchError(f"{path} is not a calibration file (tensors {sorted(tensors)})")
    images = {key: tensors[key] for key in IMAGE_KEYS if key in tensors}
    return Calibration(tensors["input_ids"], tensors["attention_mask"], metadata, **images)

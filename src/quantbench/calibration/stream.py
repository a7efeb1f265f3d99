"""How calibration samples are made from records: which records, how a chat is rendered, how samples are padded.

Plain data without heavy imports, so the workflow's DAG build and :mod:`quantbench.run.config` read it. Each
field has quantbench's choice as its default and names the published recipe's (AngelSlim at 4cc21d9) as
its other value; ``docs/fidelity.md`` says what each changes.

- ``selection``: ``shuffle`` takes records in a seeded shuffle (the seed is the calibration set's); ``first-n`` takes the first N records in
  file order (AngelSlim's ``TextDataset`` and ``MultiModalDataset``).
- ``format``: ``quantbench`` renders a whole chat through the chat template without a generation prompt;
  ``angelslim`` renders a ShareGPT record's first user/assistant pair only (a ``messages`` record whole),
  always with ``add_generation_prompt=True``, and tokenizes the rendered text with the tokenizer's
  default special tokens (image-text records: the answer turn, then the generation prompt).
- ``padding``: ``longest`` pads to the longest sample and the model gets the attention mask, so padding
  never enters a statistic; ``max-length-unmasked`` pads every sample to ``max_seq_len`` on the
  tokenizer's padding side and forwards it with no attention mask, so pad positions enter every statistic
  (absmax, Hessians, means; AngelSlim's text path); ``max-length-masked`` pads to ``max_seq_len`` and
  passes the mask to the model, but pad positions still enter the statistics (AngelSlim's image-text path,
  whose observers see every position).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from quantbench.util.errors import QuantbenchError

SELECTIONS = ("shuffle", "first-n")
FORMATS = ("quantbench", "angelslim")
PADDINGS = ("longest", "max-length-unmasked", "max-length-masked")


@dataclass(frozen=True)
class StreamSpec:
    """The calibration stream: record selection, chat format and padding (module docstring)."""

    selection: str = "shuffle"
    format: str = "quantbench"
    padding: str = "longest"

    def __post_init__(self) -> None:
        for key, allowed in (("selection", SELECTIONS), ("format", FORMATS), ("padding", PADDINGS)):
            if getattr(self, key) not in allowed:
                raise QuantbenchError(f"calibration {key} {getattr(self, key)!r} is not one of {', '.join(allowed)}")

    @property
    def pads_in_statistics(self) -> bool:
        """Whether pad positions count in the statistics (both max-length paddings)."""
        return self.padding != "longest"

    @property
    def forward_mask(self) -> bool:
        """Whether the model is given the attention mask."""
        return self.padding != "max-length-unmasked"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "calibration") -> StreamSpec:
        """The spec of a config mapping (its other keys ignored); errors name ``where``."""
        try:
            return cls(**{key: str(raw[key]) for key in ("selection", "format", "padding") if key in raw})
        except QuantbenchError as exc:
            raise QuantbenchError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain form for Snakemake ``params:`` and calibration metadata."""
        return asdict(self)

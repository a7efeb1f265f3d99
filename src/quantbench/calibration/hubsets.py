"""Image-text calibration sets from Hugging Face datasets: which dataset, split, revision and columns, and their rows.

A :class:`HubImageSet` is plain data, so the workflow plans with it without importing ``datasets``.
:func:`hub_image_records` loads the split with ``datasets.load_dataset`` (``dataset`` is a Hub id, or a
local folder of data files that ``load_dataset`` reads the same way) and returns it with its columns
renamed to the image-text record keys of :func:`quantbench.model.vlm.read_image_records`: ``image`` (decoded
to a PIL image when a row is read), ``question``, and ``answer``, or ``answers`` when the answer column
holds lists (ChartQA's ``label``), of which calibration uses the first. Rows are decoded one at a time
as they are indexed, so a large split costs only the rows calibration takes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from quantbench.util.errors import QuantbenchError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

COLUMNS = ("image", "question", "answer")


@dataclass(frozen=True)
class HubImageSet:
    """A split of a Hugging Face dataset and its image, question and answer column names."""

    dataset: str
    split: str
    image: str
    question: str
    answer: str
    revision: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "hub") -> HubImageSet:
        """The set described by ``raw`` (a config's ``hub:`` mapping); ``where`` names it in errors."""
        missing = [key for key in ("dataset", "split", *COLUMNS) if not raw.get(key)]
        if missing:
            raise QuantbenchError(
                f"{where}: missing {', '.join(repr(k) for k in missing)}; give dataset, split and the dataset's "
                "column names for image, question and answer, e.g. {dataset: HuggingFaceM4/ChartQA, split: train, "
                "image: image, question: query, answer: label}"
            )
        revision = raw.get("revision")
        return cls(
            **{key: str(raw[key]) for key in ("dataset", "split", *COLUMNS)},
            revision=str(revision) if revision else None,
        )

    def to_dict(self) -> dict[str, str]:
        """Plain form for Snakemake ``params:`` (a change reruns calibration) and calibration metadata."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    def describe(self) -> str:
        """``dataset@revision:split``, for messages and metadata."""
        return f"{self.dataset}@{self.revision or 'main'}:{self.split}"


def hub_image_records(spec: HubImageSet) -> datasets.Dataset:
    """The split of ``spec`` as a ``datasets.Dataset`` of image-text records (see the module docstring)."""
    import datasets  # here, not at the top: the workflow's DAG build reads HubImageSet without the library

    if spec.revision is None:
        log.warning("calibration set %s has no pinned revision: pin one so the samples cannot change", spec.describe())
    try:
        rows = datasets.load_dataset(spec.dataset, split=spec.split, revision=spec.revision)
    except (FileNotFoundError, ValueError) as exc:
        raise QuantbenchError(f"calibration set {spec.describe()} could not be loaded: {exc}") from None
    columns = {key: getattr(spec, key) for key in COLUMNS}
    absent = [f"{key}: {name!r}" for key, name in columns.items() if name not in rows.column_names]
    if absent:
        raise QuantbenchError(
            f"calibration set {spec.describe()} has no column {', '.join(absent)}; its columns are {rows.column_names}"
        )
    if not isinstance(rows.features[spec.image], datasets.Image):
        raise QuantbenchError(
            f"calibration set {spec.describe()}: column {spec.image!r} holds {rows.features[spec.image]}, not images; "
            "name the dataset's image column under hub.image"
        )
    if isinstance(rows.features[spec.answer], (datasets.List, datasets.LargeList)):
        columns["answers"] = columns.pop("answer")
    rows = rows.select_columns(list(dict.fromkeys(columns.values())))
    return rows.rename_columns({name: key for key, name in columns.items() if name != key})

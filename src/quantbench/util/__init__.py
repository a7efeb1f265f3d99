"""Small utilities every layer uses, with no model or workflow knowledge.

``errors`` (:class:`~quantbench.util.errors.QuantbenchError`, the one exception for errors a user can fix),
``io`` (atomic file and directory writes), ``jsonl`` (JSON Lines with errors naming file and line),
``joblog`` (a job's log file), ``provenance`` (file hashes, package versions) and ``specfile`` (specs-as-data
YAML sections read into dataclasses).
"""

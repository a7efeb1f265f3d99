"""Calibration data: records of a calibration set turned into the tokenized samples quantization runs on.

``stream`` (:class:`~quantbench.calibration.stream.StreamSpec`: which records, how a chat is rendered, how
samples are padded), ``hubsets`` (image-text sets from a Hugging Face dataset split) and ``samples``
(:class:`~quantbench.calibration.samples.Calibration`: tokenize N samples x L tokens, save and load them).
``stream`` and ``hubsets`` are plain data without heavy imports, so the run config reads them.
"""

"""What quantbench knows of a Hugging Face model's structure.

``architectures`` (per ``model_type``: the block stacks, their target linears grouped by shared input, AWQ's
smoothing mappings, and helpers that find and swap modules), ``experts`` (mixture-of-experts layers as one
linear per expert, and the calibration mode that reaches every expert) and ``vlm`` (image-text models: their
processor and one image + question as model inputs).
"""

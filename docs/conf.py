"""Sphinx configuration of the quantbench documentation (MyST Markdown pages).

Build: ``sphinx-build -W -b html docs docs/_build/html``. The quantization-benchmark page is generated:
``snakemake --configfile config/seed.yaml`` regenerates it from the reproduced tables (rule docs_page).
"""

project = "quantbench"
author = "quantbench contributors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "alabaster"

"""What a run produces for people: tables, the comparison with published numbers, the docs page.

``tables`` (long results -> eval-rst grid, CSV and Markdown tables), ``cells`` (per-cell result files into
the long frame), ``compare`` (reproduced against published cells, per table) and ``docs_page`` (the
MyST page built from the rendered tables).
"""

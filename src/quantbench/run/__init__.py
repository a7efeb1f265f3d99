"""The workflow's run: its configuration, the size of its jobs, and its departures from a published recipe.

``config`` (:func:`~quantbench.run.config.load_run_config`: the one reader of the workflow config, into
typed sections, cross-checked), ``sizing`` (GPUs, threads, memory and wall time of each job) and ``recipe``
(the published recipe as data, and a run's departures from it). Plain data without heavy imports: the
workflow's DAG build reads it. Nothing here imports Snakemake.
"""

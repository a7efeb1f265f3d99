# tabulate: one eval-rst table (+ CSV, Markdown) per configured table, from its cells' result files.


rule tabulate:
    input:
        lambda w: evals_of_table(w.table),
    output:
        rst=f"{R}/tables/{{table}}.rst",
        csv=f"{R}/tables/{{table}}.csv",
        md=f"{R}/tables/{{table}}.md",
    params:
        rows=lambda w: [list(row) for row in RUN.table_rows(RUN.table(w.table))],
        benchmarks=lambda w: list(RUN.table(w.table).benchmarks),
    log:
        "logs/tabulate/{table}.log",
    localrule: True
    script:
        "../workflow/scripts/tabulate.py"

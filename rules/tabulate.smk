# tabulate: one eval-rst table (+ CSV, Markdown) per configured table, from its cells' result files; a table
# whose published page labels its columns differently is also rendered as published (its own rule).


rule tabulate:
    input:
        lambda w: evals_of_table(w.table),
    output:
        rst=f"{R}/tables/{{table}}.rst",
        csv=f"{R}/tables/{{table}}.csv",
        md=f"{R}/tables/{{table}}.md",
    params:
        **tabulate_params(as_published=False),
    log:
        "logs/tabulate/{table}.log",
    localrule: True
    conda:
        "../envs/quantbench.yaml"
    script:
        "../workflow/scripts/tabulate.py"


rule tabulate_as_published:
    input:
        lambda w: evals_of_table(w.table),
    output:
        rst=f"{R}/tables/as-published/{{table}}.rst",
        csv=f"{R}/tables/as-published/{{table}}.csv",
        md=f"{R}/tables/as-published/{{table}}.md",
    params:
        **tabulate_params(as_published=True),
    log:
        "logs/tabulate/{table}.as-published.log",
    localrule: True
    conda:
        "../envs/quantbench.yaml"
    script:
        "../workflow/scripts/tabulate.py"

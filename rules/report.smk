# report: the comparison with the published numbers (per table), with the settings that depart from the
# published recipe (compare.recipe), and the docs page, when configured (`compare:` and `docs:` in the
# config; see config/seed.yaml).

from quantbench.run.recipe import departures, load_recipe


def compared(ext):
    """One comparison output of table {table}, flagged for `snakemake --report`."""
    return report(
        f"{R}/compare/{{table}}.{ext}",
        caption="../workflow/report/compare.rst",
        category="Comparison with the published page",
        subcategory="{table}",
    )


if "compare" in config:
    try:
        RECIPE = load_recipe(config["compare"]["recipe"]) if "recipe" in config["compare"] else None
    except QuantbenchError as exc:
        raise WorkflowError(f"invalid configuration: {exc}") from None

    rule compare:
        input:
            evals=lambda w: evals_of_table(w.table),
            published=config["compare"]["published"],
        output:
            csv=compared("csv"),
            md=compared("md"),
            png=compared("png"),
        params:
            tolerance=config["compare"].get("tolerance", 1.0),
            page_labels=lambda w: dict(RUN.table(w.table).published_labels),
            recipe=RECIPE.name if RECIPE else "",
            departures=lambda w: departures(RUN, RUN.table(w.table), RECIPE) if RECIPE else [],
        log:
            "logs/compare/{table}.log",
        localrule: True
        script:
            "../workflow/scripts/compare.py"


if "docs" in config:

    rule docs_page:
        input:
            tables=[f"{R}/tables/{t.name}.rst" for t in RUN.tables],
        output:
            config["docs"]["path"],
        params:
            title=config["docs"]["title"],
            notes=config["docs"].get("notes", []),
            sections=[
                {"title": t.options.get("section", t.name), "caption": t.caption, "note": t.options.get("note", "")}
                for t in RUN.tables
            ],
        log:
            "logs/docs_page.log",
        localrule: True
        script:
            "../workflow/scripts/docs_page.py"

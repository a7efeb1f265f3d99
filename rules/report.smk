# report: the comparison with the published numbers (per table), with the settings that depart from the
# published recipe (compare.recipe), and the docs page, when configured (`compare:` and `docs:` in the
# config; see config/seed.yaml).

from quantbench.run.recipe import departures, load_recipe

if RUN.compare:
    try:
        RECIPE = load_recipe(RUN.compare.recipe) if RUN.compare.recipe else None
    except QuantbenchError as exc:
        raise WorkflowError(f"invalid configuration: {exc}") from None

    rule compare:
        input:
            evals=lambda w: evals_of_table(w.table),
            published=str(RUN.compare.published),
        output:
            csv=compared("csv"),
            md=compared("md"),
            png=compared("png"),
        params:
            tolerance=RUN.compare.tolerance,
            page_labels=lambda w: dict(RUN.table(w.table).published_labels),
            recipe=RECIPE.name if RECIPE else "",
            departures=lambda w: departures(RUN, RUN.table(w.table), RECIPE) if RECIPE else [],
        log:
            "logs/compare/{table}.log",
        localrule: True
        conda:
            "../envs/quantbench.yaml"
        script:
            "../workflow/scripts/compare.py"


if RUN.docs:

    rule docs_page:
        input:
            tables=[f"{R}/tables/{t.name}.rst" for t in RUN.tables],
        output:
            str(RUN.docs.path),
        params:
            title=RUN.docs.title,
            notes=list(RUN.docs.notes),
            sections=[
                {"title": t.options.get("section", t.name), "caption": t.caption, "note": t.options.get("note", "")}
                for t in RUN.tables
            ],
        log:
            "logs/docs_page.log",
        localrule: True
        conda:
            "../envs/quantbench.yaml"
        script:
            "../workflow/scripts/docs_page.py"

# report: the comparison with the published numbers (per table) and the docs page, when configured
# (`compare:` and `docs:` in the config; see config/seed.yaml).

if "compare" in config:

    rule compare:
        input:
            evals=lambda w: evals_of_table(w.table),
            published=config["compare"]["published"],
        output:
            csv=report(
                f"{R}/compare/{{table}}.csv",
                caption="../workflow/report/compare.rst",
                category="Comparison with the published page",
                subcategory="{table}",
            ),
            md=report(
                f"{R}/compare/{{table}}.md",
                caption="../workflow/report/compare.rst",
                category="Comparison with the published page",
                subcategory="{table}",
            ),
            png=report(
                f"{R}/compare/{{table}}.png",
                caption="../workflow/report/compare.rst",
                category="Comparison with the published page",
                subcategory="{table}",
            ),
        params:
            tolerance=config["compare"].get("tolerance", 1.0),
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

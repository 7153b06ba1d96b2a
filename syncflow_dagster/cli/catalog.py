"""`syncflow catalog check [PATH]`: validate an entity catalog, with no database and no server.

One line per real mistake, naming the entity and the field (a mistake in one
field never brings errors about fields that are fine); exit 0 when the
catalog is valid, 2 when it is not. Without PATH it checks the catalog the
code location would load: $SYNCFLOW_CATALOG_PATH, else the packaged default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from syncflow_dagster.cli.errors import EXIT_USER_ERROR, err_console

console = Console()
catalog_app = typer.Typer(help="The entity catalog: what is synced.", no_args_is_help=True)


@catalog_app.command("check")
def catalog_check(
    path: Annotated[
        Path | None,
        typer.Argument(help="Catalog YAML; default $SYNCFLOW_CATALOG_PATH, else the packaged catalog."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Validate a catalog: one line per mistake (entity, field, what is wrong); exit 2 if there is one."""
    from importlib import resources

    from syncflow_dagster.catalog.loader import CATALOG_PATH_ENV, DEFAULT_CATALOG, check_catalog

    chosen = path or (Path(os.environ[CATALOG_PATH_ENV]) if os.environ.get(CATALOG_PATH_ENV) else None)
    if chosen is None:
        origin = f"(packaged {DEFAULT_CATALOG})"
        text = resources.files("syncflow_dagster.catalog").joinpath(DEFAULT_CATALOG).read_text("utf-8")
    else:
        origin = str(chosen)
        try:
            text = chosen.read_text("utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read catalog {chosen}: {exc.strerror or exc}") from None
    catalog, problems = check_catalog(text)
    if as_json:
        from syncflow_dagster.cli.tables import print_json

        order = list(catalog.topological_order) if catalog else []
        print_json({"catalog": origin, "valid": catalog is not None, "entities": order, "errors": problems})
        if catalog is None:
            raise typer.Exit(EXIT_USER_ERROR)
        return
    if catalog is None:
        for problem in problems:
            err_console.print(
                f"[red]error:[/red] catalog {origin}: {problem}", markup=True, soft_wrap=True, highlight=False
            )
        raise typer.Exit(EXIT_USER_ERROR)
    names = ", ".join(catalog.topological_order)
    console.print(
        f"catalog {origin}: valid, {len(catalog.entities)} entities (parents first: {names})", soft_wrap=True
    )

"""`syncflow catalog check [PATH]`: validate an entity catalog, with no database and no server.
`syncflow catalog show`: print the catalog in force, to start your own from it.

One line per real mistake, naming the entity and the field (a mistake in one
field never brings errors about fields that are fine); exit 0 when the
catalog is valid, 2 when it is not. Without PATH it checks the catalog the
code location would load: $SYNCFLOW_CATALOG_PATH, else the packaged default.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from syncflow_dagster.cli.errors import EXIT_USER_ERROR, err_console

console = Console()
catalog_app = typer.Typer(help="The entity catalog: what is synced.", no_args_is_help=True)


def _catalog_text(path: Path | None) -> tuple[str, str]:
    """(origin, YAML text) of PATH, else $SYNCFLOW_CATALOG_PATH, else the packaged catalog."""
    from importlib import resources

    from syncflow_dagster.catalog.loader import CATALOG_PATH_ENV, DEFAULT_CATALOG

    chosen = path or (Path(os.environ[CATALOG_PATH_ENV]) if os.environ.get(CATALOG_PATH_ENV) else None)
    if chosen is None:
        text = resources.files("syncflow_dagster.catalog").joinpath(DEFAULT_CATALOG).read_text("utf-8")
        return f"(packaged {DEFAULT_CATALOG})", text
    try:
        return str(chosen), chosen.read_text("utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read catalog {chosen}: {exc.strerror or exc}") from None


@catalog_app.command("show")
def catalog_show() -> None:
    """Print the catalog in force ($SYNCFLOW_CATALOG_PATH, else the packaged one) as its YAML."""
    _, text = _catalog_text(None)
    sys.stdout.write(text)


@catalog_app.command("check")
def catalog_check(
    path: Annotated[
        Path | None,
        typer.Argument(help="Catalog YAML; default $SYNCFLOW_CATALOG_PATH, else the packaged catalog."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Validate a catalog: one line per mistake (entity, field, what is wrong); exit 2 if there is one."""
    from syncflow_dagster.catalog.loader import check_catalog

    origin, text = _catalog_text(path)
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

"""The `syncflow` command: one Typer app; each concern mounts its sub-commands here."""

from __future__ import annotations

import typer

from syncflow_dagster.cli.simulate import simulate_app

app = typer.Typer(
    name="syncflow",
    help="SyncFlow: change-only, parent-first sync of ERP records from APISmith into ScheduleHub.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(simulate_app, name="simulate")


if __name__ == "__main__":  # `python -m syncflow_dagster.cli.main`
    app()

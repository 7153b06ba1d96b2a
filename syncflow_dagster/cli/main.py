"""The `syncflow` command: one Typer app; each concern mounts its sub-commands here."""

from __future__ import annotations

from syncflow_dagster.cli import ops
from syncflow_dagster.cli.catalog import catalog_app
from syncflow_dagster.cli.demo import demo
from syncflow_dagster.cli.dev import dev
from syncflow_dagster.cli.errors import SyncflowTyper
from syncflow_dagster.cli.frames import frame_app
from syncflow_dagster.cli.repair import resync
from syncflow_dagster.cli.simulate import simulate_app
from syncflow_dagster.cli.sync import sync
from syncflow_dagster.cli.trace import trace

# SyncflowTyper: known errors end in one line and a non-zero exit (cli/errors.py).
app = SyncflowTyper(
    name="syncflow",
    help="SyncFlow: change-only, parent-first sync of ERP records from APISmith into ScheduleHub.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(simulate_app, name="simulate")
app.add_typer(frame_app, name="frame")
app.add_typer(catalog_app, name="catalog")
ops.register(app)
app.command("trace")(trace)
app.command("demo")(demo)
app.command("dev")(dev)
app.command("sync")(sync)
app.command("resync")(resync)


if __name__ == "__main__":  # `python -m syncflow_dagster.cli.main`
    app()

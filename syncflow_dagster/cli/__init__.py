"""The `syncflow` command line (Typer): `syncflow_dagster.cli.main:app` with its sub-commands."""

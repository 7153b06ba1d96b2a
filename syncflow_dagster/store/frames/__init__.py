"""The stage-frame store: chunk codec, Postgres client, streaming reader/writer, Dagster IO manager."""

"""`syncflow trace`: one record's history after real syncs (stand-ins over HTTP, real Postgres), as a user runs it."""

from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa

from syncflow_dagster.defs.runner import materialize_sync
from syncflow_dagster.store.schema import pending_children
from syncflow_dagster_tests.cli.test_cli_ops import syncflow
from syncflow_dagster_tests.sync_harness import deployment


def test_trace_shows_the_wait_the_delivery_with_its_run_and_the_frames(fresh_database_url: str) -> None:
    today = dt.datetime.now(dt.UTC).date()
    with deployment(fresh_database_url, rows=200, seed=3) as env:
        # Work centers before their sites: they wait for them.
        early = materialize_sync("work_centers", today, resources=env.resources)
        engine = env.resources["database"].engine
        with engine.connect() as conn:
            bk = conn.execute(
                sa.select(pending_children.c.bk).where(pending_children.c.entity == "work_centers").limit(1)
            ).scalar_one()
        site, code = bk.split("\x1f")

        waiting = json.loads(
            syncflow("trace", "work_centers", site, code, "--json", database_url=fresh_database_url).stdout
        )
        assert waiting["state"] is None
        assert waiting["waiting_for"]["parent_entity"] == "sites"
        (parked,) = waiting["deliveries"]
        assert (parked["status"], parked["run_id"], parked["kind"]) == ("parked", early.run_id, "sync")
        assert parked["outcome"] == f"sites {site}"

        assert materialize_sync("sites", today, resources=env.resources).success
        late = materialize_sync("work_centers", today, resources=env.resources)
        assert late.success

    shown = syncflow("trace", "work_centers", f"{site}␟{code}", database_url=fresh_database_url, COLUMNS="80")
    assert shown.returncode == 0, shown.stderr
    assert f"{site}␟{code}" in shown.stdout
    assert all(len(line.rstrip()) <= 80 for line in shown.stdout.splitlines() if "frames of" not in line)
    assert late.run_id[:8] in shown.stdout

    traced = json.loads(
        syncflow("trace", "work_centers", site, code, "--json", database_url=fresh_database_url).stdout
    )
    assert traced["waiting_for"] is None
    assert traced["state"]["schedulehub_id"]
    statuses = [(d["status"], d["run_id"]) for d in traced["deliveries"]]
    assert statuses == [("parked", early.run_id), ("accepted", late.run_id)]
    delivered = traced["deliveries"][-1]
    assert (delivered["action"], delivered["outcome"]) == ("insert", "created")
    assert delivered["data_hash"] == traced["state"]["data_hash"]
    assert delivered["rowversion"] == traced["state"]["rowversion"]
    (frames,) = traced["frames"]
    assert frames["date"] == today.isoformat()
    # The late run did not read the record again (nothing changed after the early run's read
    # mark): it came back from parking, so it is in the delivered frame and not in the identified one.
    assert frames["identified"] is None
    assert frames["delivered"]["_delivery_status"] == "accepted"

    wrong = syncflow("trace", "work_centers", site, database_url=fresh_database_url)
    assert wrong.returncode == 2
    assert "the key has 1 part(s)" in wrong.stderr

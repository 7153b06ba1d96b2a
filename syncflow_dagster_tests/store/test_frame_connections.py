"""Who owns the frame store's connections: a client's `with` block, or the IO manager's run.

Nothing is kept at module level: the idle connections are closed when their
owner ends (the driver's finalizer complains of a connection left to it at
interpreter shutdown), a connection that failed is never handed out again, and
a stage table is checked once per owner (test_frame_io_manager.py). A run's
one pool, shared by its stages and closed by the teardown, is checked in
test_frame_handoff_tokens.py through `materialize`.
"""

import datetime as dt
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

from syncflow_dagster.store.frames.client import FrameConnections, FrameSlice, PostgresFrameClient
from syncflow_dagster.store.frames.codec import PARTITION_COLUMN, FrameStoreError
from syncflow_dagster.store.frames.io_manager import PostgresFrameIOManager

DAY = dt.date(2026, 11, 28)
SCHEMA = "syncflow_stage_connections"


def _frame(values: list[int]) -> pa.Table:
    return pa.table(
        {"v": pa.array(values, pa.int64()), PARTITION_COLUMN: pa.array([DAY] * len(values), pa.date32())}
    )


def test_a_client_reuses_its_connections_and_closes_them_when_its_block_ends(database_url: str) -> None:
    where = FrameSlice("pool__items", "items", (DAY,))
    with PostgresFrameClient(database_url, SCHEMA) as client:
        connections = client.connections
        client.replace_slice(where, _frame([1, 2, 3]))
        assert connections.idle == 1  # the write's connection waits for the next user
        with client.connect() as first:
            pass
        with client.connect() as second:
            assert second is first, "a connection given back was not reused"
        assert client.select_slice(where)["v"].to_pylist() == [1, 2, 3]
        assert connections.idle == 1
    assert connections.closed
    assert connections.idle == 0
    with pytest.raises(FrameStoreError, match="has no connections"):
        client.select_slice(where)


def test_a_connection_that_failed_is_discarded_not_given_back(database_url: str) -> None:
    with PostgresFrameClient(database_url, SCHEMA) as client:
        with client.connect() as healthy:
            pass
        taken: list[Any] = []
        with pytest.raises(RuntimeError, match="the stage failed"):
            _fail_with(client, taken)
        assert taken == [healthy]
        assert client.connections.idle == 0
        with client.connect() as fresh:
            assert fresh is not healthy


def _fail_with(client: PostgresFrameClient, taken: list[Any]) -> None:
    with client.connect() as conn:
        taken.append(conn)
        raise RuntimeError("the stage failed")


def test_a_closed_pool_keeps_nothing_and_refuses_to_hand_out(database_url: str) -> None:
    """A writer still open when its owner ends gives its connection back to a closed pool: it is closed."""
    connections = FrameConnections()
    client = PostgresFrameClient(database_url, SCHEMA, connections=connections)
    writer = client.writer(FrameSlice("late__items", "items", (DAY,)))
    writer.open()
    writer.write(_frame([7]))
    connections.close()
    writer.close()  # commits, then gives its connection back
    assert connections.idle == 0
    with pytest.raises(FrameStoreError, match="connections are closed"):
        client.select_slice(FrameSlice("late__items", "items", (DAY,)))
    with PostgresFrameClient(database_url, SCHEMA) as reading:
        assert reading.select_slice(FrameSlice("late__items", "items", (DAY,)))["v"].to_pylist() == [7]


def test_a_client_given_connections_leaves_them_to_their_owner(database_url: str) -> None:
    with FrameConnections() as connections:
        with PostgresFrameClient(database_url, SCHEMA, connections=connections) as client:
            client.replace_slice(FrameSlice("shared__items", "items", (DAY,)), _frame([1]))
        assert not connections.closed
        assert connections.idle == 1
    assert connections.closed
    assert connections.idle == 0


def test_the_io_manager_is_set_up_with_its_connections_and_torn_down_without_them(database_url: str) -> None:
    manager = PostgresFrameIOManager(database_url=database_url, schema_name=SCHEMA)
    with pytest.raises(FrameStoreError, match="not set up for execution"):
        _ = manager.connections
    with dg.build_resources({"frames": manager}) as resources:
        set_up: PostgresFrameIOManager = resources.frames
        connections = set_up.connections
        with set_up.writer("lifecycle", "items", (DAY,)) as writer:
            writer.write(_frame([1, 2]))
        assert connections.idle == 1
    assert connections.closed
    assert connections.idle == 0
    with pytest.raises(FrameStoreError, match="not set up for execution"):
        _ = set_up.connections

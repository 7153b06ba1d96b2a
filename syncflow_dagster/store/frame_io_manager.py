"""Where the frame store's names used to live: the store is now the package `store/frames/`.

Kept for modules outside the stage pipeline (definitions, the CLI's `frame
show`, `syncflow trace`, the demo) until they import from the package.
"""

from syncflow_dagster.store.frames.client import FrameSlice, PostgresFrameClient, stage_table_name
from syncflow_dagster.store.frames.codec import PARTITION_COLUMN, FrameLostError, FrameStoreError
from syncflow_dagster.store.frames.io_manager import (
    PostgresFrameIOManager,
    partition_scope,
    partition_scopes,
)
from syncflow_dagster.store.frames.stream import EntityFrames, EntityStreams, StoredFrame

__all__ = [
    "PARTITION_COLUMN",
    "EntityFrames",
    "EntityStreams",
    "FrameLostError",
    "FrameSlice",
    "FrameStoreError",
    "PostgresFrameClient",
    "PostgresFrameIOManager",
    "StoredFrame",
    "partition_scope",
    "partition_scopes",
    "stage_table_name",
]

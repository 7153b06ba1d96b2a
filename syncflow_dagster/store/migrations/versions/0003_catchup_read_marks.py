"""Catch-up reads: the per-entity read-through mark and the snapshot each catch-up batch read at.

* `read_marks`: per entity, the APISmith rowversion up to which every change and
  tombstone has been read and accounted for (committed, failed or parked),
  whatever its change time. The catch-up read of a run of today starts after it.
* `read_snapshots`: per batch, the mark its read started after and the snapshot
  rowversion it was pinned at; the persist stage turns it into the entity's mark.

Revision ID: catchup_0003
Revises: ops_0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "catchup_0003"
down_revision: str | None = "ops_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = "syncflow"
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "read_marks",
        sa.Column("entity", sa.Text, primary_key=True),
        sa.Column("rowversion", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        schema=S,
    )
    op.create_table(
        "read_snapshots",
        sa.Column("batch_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("entity", sa.Text, nullable=False),
        sa.Column("after_rowversion", sa.BigInteger, nullable=False),
        sa.Column("snapshot_rowversion", sa.BigInteger, nullable=False),
        sa.Column("noted_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("read_snapshots", schema=S)
    op.drop_table("read_marks", schema=S)

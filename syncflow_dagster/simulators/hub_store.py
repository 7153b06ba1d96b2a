"""The ScheduleHub stand-in's records on disk: one SQLite file, one table per resource.

Every batch is applied in one SQLite transaction (WAL, synchronous=NORMAL), so
a stopped or killed stand-in comes back with every batch it answered. Nothing
is held per record in Python: a batch looks up the keys it names (existing
records, their parents, the children that reference them) with one query per
resource, decides the rows and writes the outcome back. Per resource, a table
`r_<resource>` holds the creation sequence (its rowid: the read-back cursor
and the `sh_<resource>_<seq>` id), the external key (unique index) and the
attributes and references as canonical JSON text (compact, sorted keys, the
bytes orjson writes); `resources` holds each resource's next sequence number
and record count, so counts never scan; `reference_kinds` holds which
resources reference which, so a restricted delete knows where to look.

A batch of clean Arrow rows (`upsert_columns`) is decided column by column
(`arrow_json.py` writes the canonical JSON of every row with Arrow kernels);
a JSON batch, or one with a key twice or a reference into its own resource,
is decided row by row in order (`upsert`). Both give the same outcome per row
(syncflow_dagster_tests/simulators/test_schedulehub_columnar.py).

Why SQLite rather than Parquet+Arrow files: the workload is keyed
read-modify-write in batches of 5000 (idempotent upserts, deletes, parent
checks) plus cursor reads; a B-tree does exactly that with bounded memory,
while Parquet files would need a home-made key index, compaction and crash
safety. docs/contracts/schedulehub.md (Stand-in storage) has the measurements.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

RESOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DATABASE_FILE = "schedulehub.sqlite3"
LOCK_FILE = "schedulehub.lock"
# SQLite page cache per connection (KiB, negative = size): enough for the key
# index's upper levels at 10M records, small against the 2 GB the stand-in may use.
CACHE_KIB = 131_072
_SORTED = orjson.OPT_SORT_KEYS
_pc: Any = pc  # pyarrow's stubs do not type the kernels' array-and-scalar forms

# Result tuple: external_key, status, id, outcome, reason_code, retryable, detail.
Result = tuple[Any, str, str | None, str | None, str | None, bool, str | None]


class DataDirInUseError(RuntimeError):
    """Another ScheduleHub stand-in holds this data directory."""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as read back: creation sequence, key, attributes and references."""

    seq: int
    external_key: str
    attributes: dict[str, Any]
    references: dict[str, str]

    def id(self, resource: str) -> str:
        return record_id(resource, self.seq)


def records_of(
    seqs: Sequence[int], keys: Sequence[str], attributes: Sequence[str], refs: Sequence[str | None]
) -> list[StoredRecord]:
    return [
        StoredRecord(seq, key, orjson.loads(attrs), orjson.loads(ref) if ref else {})
        for seq, key, attrs, ref in zip(seqs, keys, attributes, refs, strict=True)
    ]


def record_id(resource: str, seq: int) -> str:
    return f"sh_{resource}_{seq}"


def encode(value: dict[str, Any]) -> str:
    """Canonical JSON of an attributes or references object (compact, sorted keys): equal content, equal text."""
    return orjson.dumps(value, option=_SORTED).decode()


def _table(resource: str) -> str:
    # Resource names are checked against ^[a-z][a-z0-9_]{0,62}$ before they get here.
    return f'"r_{resource}"'


class HubStore:
    """All resources ScheduleHub holds, in `<data_dir>/schedulehub.sqlite3`.

    `data_dir=None` keeps the records in a temporary directory that `close()`
    removes. `open()` takes an exclusive lock on the directory: two stand-ins
    on one data directory would hand out the same ids.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._temporary: Path | None = None
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        # resource -> [next_seq, row_count]: the `resources` table, mirrored.
        self._meta: dict[str, list[int]] = {}
        # (child resource, parent resource) pairs seen in references: `reference_kinds`, mirrored.
        self._kinds: set[tuple[str, str]] = set()

    # --- life cycle ------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        folder = self.data_dir or self._temporary
        if folder is None:
            raise RuntimeError("the ScheduleHub store is not open")
        return folder

    def open(self) -> HubStore:
        if self._conn is not None:
            return self
        if self.data_dir is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="syncflow-schedulehub-"))
        folder = self.directory
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUseError(
                f"ScheduleHub data directory {folder} is in use by another stand-in; "
                "stop it or choose another --data-dir"
            ) from None
        self._lock_fd = fd
        self._connect()
        return self

    def _connect(self) -> None:
        conn = sqlite3.connect(self.directory / DATABASE_FILE, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS resources "
            "(name TEXT PRIMARY KEY, next_seq INTEGER NOT NULL, row_count INTEGER NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS reference_kinds (child TEXT NOT NULL, parent TEXT NOT NULL, "
            "PRIMARY KEY (child, parent)) WITHOUT ROWID"
        )
        self._conn = conn
        self._meta = {
            name: [next_seq, count]
            for name, next_seq, count in conn.execute("SELECT name, next_seq, row_count FROM resources")
        }
        self._kinds = set(conn.execute("SELECT child, parent FROM reference_kinds").fetchall())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None

    def __enter__(self) -> HubStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the ScheduleHub store is not open")
        return self._conn

    def reset(self) -> None:
        """Forget every record: the database file is removed and made anew (disk space comes back)."""
        self.conn.close()
        self._conn = None
        for suffix in ("", "-wal", "-shm"):
            (self.directory / f"{DATABASE_FILE}{suffix}").unlink(missing_ok=True)
        self._connect()

    # --- reads -----------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {name: meta[1] for name, meta in sorted(self._meta.items())}

    def has_resource(self, resource: str) -> bool:
        return resource in self._meta

    def get(self, resource: str, key: str) -> StoredRecord | None:
        if resource not in self._meta:
            return None
        row = self.conn.execute(
            f"SELECT seq, attributes, refs FROM {_table(resource)} WHERE external_key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        seq, attributes, refs = row
        return StoredRecord(seq, key, orjson.loads(attributes), orjson.loads(refs) if refs else {})

    def page_texts(
        self, resource: str, after: int, limit: int
    ) -> tuple[list[int], list[str], list[str], list[str | None], int | None]:
        """Up to `limit` records created after sequence `after`, as stored (seq, key, attributes and
        references JSON), and the cursor of the next page (None at the end)."""
        if resource not in self._meta:
            return [], [], [], [], None
        rows = self.conn.execute(
            f"SELECT seq, external_key, attributes, refs FROM {_table(resource)} "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if not rows:
            return [], [], [], [], None
        seqs, keys, attributes, refs = (list(column) for column in zip(*rows, strict=True))
        return seqs, keys, attributes, refs, (seqs[-1] if more else None)

    def page(self, resource: str, after: int, limit: int) -> tuple[list[StoredRecord], int | None]:
        """Up to `limit` records created after sequence `after`, and the cursor of the next page (or None)."""
        seqs, keys, attributes, refs, next_seq = self.page_texts(resource, after, limit)
        return records_of(seqs, keys, attributes, refs), next_seq

    def iter_records(self, resource: str, batch: int = 10_000) -> Iterator[StoredRecord]:
        """Every record of `resource` in creation order, read `batch` at a time."""
        after = 0
        while True:
            records, next_seq = self.page(resource, after, batch)
            yield from records
            if next_seq is None:
                return
            after = next_seq

    def child_counts(self, parent: str, keys: Iterable[str]) -> dict[str, int]:
        """parent key -> how many records reference it, for `keys` of resource `parent`.

        A scan of every resource that references `parent` (no index is kept
        for this: only a restricted delete asks, and that is a test switch).
        """
        wanted = orjson.dumps(list(set(keys))).decode()
        counts: Counter[str] = Counter()
        for child, _ in sorted(k for k in self._kinds if k[1] == parent):
            path = f"$.{parent}"
            for key, n in self.conn.execute(
                f"SELECT json_extract(refs, ?) AS parent_key, count(*) FROM {_table(child)} "
                "WHERE refs IS NOT NULL AND parent_key IN (SELECT value FROM json_each(?)) GROUP BY parent_key",
                (path, wanted),
            ):
                counts[key] += n
        return dict(counts)

    def _existing(self, resource: str, keys: Iterable[str]) -> dict[str, list[Any]]:
        """key -> [seq, attributes bytes, refs bytes] for the keys `resource` holds."""
        if resource not in self._meta:
            return {}
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        return {
            key: [seq, attributes, refs]
            for key, seq, attributes, refs in self.conn.execute(
                f"SELECT external_key, seq, attributes, refs FROM {_table(resource)} "
                "WHERE external_key IN (SELECT value FROM json_each(?))",
                (orjson.dumps(wanted).decode(),),
            )
        }

    def _held(self, resource: str, keys: Iterable[str]) -> set[str]:
        if resource not in self._meta:
            return set()
        wanted = list(set(keys))
        if not wanted:
            return set()
        return {
            key
            for (key,) in self.conn.execute(
                f"SELECT external_key FROM {_table(resource)} "
                "WHERE external_key IN (SELECT value FROM json_each(?))",
                (orjson.dumps(wanted).decode(),),
            )
        }

    # --- writes ----------------------------------------------------------------------------------

    def ensure_resource(self, resource: str) -> None:
        """The resource exists from its first batch upsert on (listed with its count, even 0)."""
        if resource in self._meta:
            return
        with self._transaction() as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_table(resource)} (seq INTEGER PRIMARY KEY, "
                "external_key TEXT NOT NULL UNIQUE, attributes TEXT NOT NULL, refs TEXT)"
            )
            conn.execute("INSERT OR IGNORE INTO resources VALUES (?, 1, 0)", (resource,))
        self._meta[resource] = [1, 0]

    def _note_kinds(self, conn: sqlite3.Connection, resource: str, parents: Iterable[str]) -> None:
        new = [(resource, parent) for parent in parents if (resource, parent) not in self._kinds]
        if new:
            conn.executemany("INSERT OR IGNORE INTO reference_kinds VALUES (?, ?)", new)
            self._kinds.update(new)

    def _write(
        self,
        resource: str,
        inserts: Sequence[tuple[Any, ...]],
        updates: Sequence[tuple[Any, ...]],
        next_seq: int,
        parents: Iterable[str],
    ) -> None:
        """One transaction: new records, changed records, the sequence and the count."""
        table = _table(resource)
        with self._transaction() as conn:
            if inserts:
                conn.executemany(
                    f"INSERT INTO {table} (seq, external_key, attributes, refs) VALUES (?, ?, ?, ?)", inserts
                )
            if updates:
                conn.executemany(f"UPDATE {table} SET attributes = ?, refs = ? WHERE seq = ?", updates)
            self._note_kinds(conn, resource, parents)
            conn.execute(
                "UPDATE resources SET next_seq = ?, row_count = row_count + ? WHERE name = ?",
                (next_seq, len(inserts), resource),
            )
        meta = self._meta[resource]
        meta[0] = next_seq
        meta[1] += len(inserts)

    def upsert(
        self,
        resource: str,
        rows: Sequence[tuple[Any, Any, Any]],
        clean: Sequence[bool] | None = None,
        skip: Sequence[bool] | None = None,
    ) -> list[Result]:
        """Apply `rows` (key, attributes, references) one after the other; one result per row.

        `clean[i]` says row i's shape was already checked column by column (no
        `validate` needed). `skip[i]` marks a row the caller answers itself (a
        transient failure): nothing is applied and its result is a placeholder.
        """
        clean = clean if clean is not None else [False] * len(rows)
        skip = skip if skip is not None else [False] * len(rows)
        self.ensure_resource(resource)
        parents_wanted: dict[str, set[str]] = {}
        for (_key, _attributes, references), skipped in zip(rows, skip, strict=True):
            if not skipped and isinstance(references, dict):
                for parent, parent_key in references.items():
                    if isinstance(parent, str) and isinstance(parent_key, str):
                        parents_wanted.setdefault(parent, set()).add(parent_key)
        held = {
            parent: self._held(parent, keys) for parent, keys in parents_wanted.items() if parent != resource
        }
        keys = [key for key, _, _ in rows if isinstance(key, str)]
        existing = self._existing(resource, [*keys, *parents_wanted.get(resource, ())])
        next_seq = self._meta[resource][0]
        dirty: dict[str, list[Any]] = {}  # key -> [seq, attributes, refs, is_new]
        parents_seen: set[str] = set()
        results: list[Result] = []
        for (key, attributes, references), checked, skipped in zip(rows, clean, skip, strict=True):
            if skipped:
                results.append((key, REJECTED, None, None, None, True, None))
                continue
            if not checked:
                problem = validate(key, attributes, references)
                if problem is not None:
                    results.append(_rejected(key, INVALID_RECORD, problem))
                    continue
            missing = next(
                (
                    (parent, parent_key)
                    for parent, parent_key in references.items()
                    if parent_key not in (existing if parent == resource else held.get(parent, ()))
                ),
                None,
            )
            if missing is not None:
                results.append(_rejected(key, PARENT_MISSING, parent_missing_detail(*missing)))
                continue
            parents_seen.update(references)
            attributes_text = encode(attributes)
            refs_text = encode(references) if references else None
            found = existing.get(key)
            if found is None:
                seq = next_seq
                next_seq += 1
                existing[key] = [seq, attributes_text, refs_text]
                dirty[key] = [seq, attributes_text, refs_text, True]
                results.append((key, ACCEPTED, record_id(resource, seq), CREATED, None, False, None))
                continue
            seq = found[0]
            if found[1] == attributes_text and found[2] == refs_text:
                results.append((key, ACCEPTED, record_id(resource, seq), UNCHANGED, None, False, None))
                continue
            found[1], found[2] = attributes_text, refs_text
            previous = dirty.get(key)
            dirty[key] = [seq, attributes_text, refs_text, previous[3] if previous else False]
            results.append((key, ACCEPTED, record_id(resource, seq), UPDATED, None, False, None))
        if dirty:
            self._write(
                resource,
                [(v[0], k, v[1], v[2]) for k, v in dirty.items() if v[3]],
                [(v[1], v[2], v[0]) for v in dirty.values() if not v[3]],
                next_seq,
                parents_seen,
            )
        return results

    def upsert_columns(
        self,
        resource: str,
        keys: Any,
        attributes: Any,
        refs: Any,
        references: Mapping[str, Any],
        rejected: Any = None,
    ) -> pa.Table:
        """`upsert` for a batch decided column by column; the results as Arrow (RESULT_SCHEMA).

        The caller guarantees unique keys, no reference into `resource` itself,
        and rows whose shape passed `validate` (or are marked in `rejected`, a
        string array of `invalid_record` details, null for a valid row).
        `attributes` and `refs` are each row's canonical JSON text
        (`arrow_json`); `references` maps each parent resource, in the batch's
        column order, to its key column (null = no reference).
        """
        self.ensure_resource(resource)
        n = len(keys)
        invalid = (
            np.zeros(n, dtype=bool)
            if rejected is None
            else np.asarray(_pc.is_valid(rejected).to_numpy(zero_copy_only=False), dtype=bool)
        )
        # The first missing parent per row, in the batch's column order.
        missing_parent = np.full(n, -1, dtype=np.int64)
        parents = list(references)
        for index, parent in enumerate(parents):
            column = references[parent]
            present = np.asarray(_pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)
            if not present.any():
                continue
            wanted = _pc.unique(column.filter(_pc.is_valid(column))).to_pylist()
            held = pa.array(sorted(self._held(parent, wanted)), pa.string())
            ok = np.asarray(_pc.is_in(column, value_set=held).to_numpy(zero_copy_only=False), dtype=bool)
            missing = present & ~ok & ~invalid & (missing_parent < 0)
            missing_parent[missing] = index
        refused = invalid | (missing_parent >= 0)
        candidates = keys.filter(pa.array(~refused))
        found_rows = self._existing(resource, candidates.to_pylist())
        found_keys = pa.array(list(found_rows), pa.string())
        position: Any = _pc.index_in(keys, value_set=found_keys)
        found = np.asarray(_pc.is_valid(position).to_numpy(zero_copy_only=False), dtype=bool) & ~refused
        new = ~refused & ~found
        values = list(found_rows.values())
        old_seq = np.array([v[0] for v in values], dtype=np.int64)
        old_attributes: Any = pa.array([v[1] for v in values], pa.string())
        old_refs: Any = pa.array([v[2] for v in values], pa.string())
        taken: Any = _pc.fill_null(position, 0) if len(values) else pa.array(np.zeros(n, dtype=np.int32))
        same = np.zeros(n, dtype=bool)
        seq = np.zeros(n, dtype=np.int64)
        if len(values):
            was_attributes = old_attributes.take(taken)
            was_refs = old_refs.take(taken)
            same_attributes = _pc.fill_null(_pc.equal(attributes, was_attributes), False)
            same_refs = _pc.or_(
                _pc.and_(_pc.is_null(refs), _pc.is_null(was_refs)),
                _pc.fill_null(_pc.equal(refs, was_refs), False),
            )
            same = np.asarray(_pc.and_(same_attributes, same_refs).to_numpy(zero_copy_only=False), dtype=bool)
            seq = old_seq[np.asarray(taken.to_numpy(zero_copy_only=False), dtype=np.int64)]
        updated = found & ~same
        first_seq = self._meta[resource][0]
        created = int(new.sum())
        seq[new] = first_seq + np.arange(created, dtype=np.int64)
        accepted = ~refused
        ids = _pc.binary_join_element_wise(f"sh_{resource}_", _pc.cast(pa.array(seq), pa.string()), "")
        outcome = np.where(new, CREATED, np.where(updated, UPDATED, UNCHANGED))
        reason = np.where(invalid, INVALID_RECORD, PARENT_MISSING)
        detail: list[str | None] = [None] * n
        if refused.any():
            invalid_detail = rejected.to_pylist() if rejected is not None else None
            for row in np.flatnonzero(refused):
                if invalid[row] and invalid_detail is not None:
                    detail[row] = invalid_detail[row]
                else:
                    parent = parents[missing_parent[row]]
                    detail[row] = parent_missing_detail(parent, references[parent][int(row)].as_py())
        mask = pa.array(accepted)
        results = pa.table(
            {
                "external_key": keys,
                "status": _pc.if_else(mask, ACCEPTED, REJECTED),
                "id": _pc.if_else(mask, ids, pa.scalar(None, pa.string())),
                "outcome": _pc.if_else(mask, pa.array(outcome, pa.string()), pa.scalar(None, pa.string())),
                "reason_code": _pc.if_else(mask, pa.scalar(None, pa.string()), pa.array(reason, pa.string())),
                "retryable": pa.array(np.zeros(n, dtype=bool)),
                "detail": pa.array(detail, pa.string()),
            }
        )
        if created or updated.any():
            new_mask, updated_mask = pa.array(new), pa.array(updated)
            inserts = list(
                zip(
                    seq[new].tolist(),
                    keys.filter(new_mask).to_pylist(),
                    attributes.filter(new_mask).to_pylist(),
                    refs.filter(new_mask).to_pylist(),
                    strict=True,
                )
            )
            changes = list(
                zip(
                    attributes.filter(updated_mask).to_pylist(),
                    refs.filter(updated_mask).to_pylist(),
                    seq[updated].tolist(),
                    strict=True,
                )
            )
            used = [p for p in parents if _pc.any(_pc.is_valid(references[p])).as_py()]
            self._write(resource, inserts, changes, first_seq + created, used)
        return results

    def delete(
        self, resource: str, keys: Sequence[Any], restrict: bool, skip: Sequence[bool]
    ) -> list[Result]:
        """Delete `keys` in order (idempotent: an unknown key is `not_found`); one result per key.

        `skip[i]` marks a key the caller answers itself (a transient failure):
        its result is a placeholder the caller replaces.
        """
        valid = [k for k in keys if isinstance(k, str) and k]
        existing = self._existing(resource, valid)
        children = self.child_counts(resource, existing) if restrict and existing else {}
        released: Counter[str] = Counter()  # children of this resource deleted earlier in the batch
        deleted: list[int] = []
        results: list[Result] = []
        for key, skipped in zip(keys, skip, strict=True):
            if skipped:
                results.append((key, REJECTED, None, None, None, True, None))
                continue
            if not isinstance(key, str) or not key:
                results.append(_rejected(str(key), INVALID_RECORD, "external_key must be a non-empty string"))
                continue
            found = existing.pop(key, None)
            if found is None:
                # Idempotent: deleting what is not there is success, said so.
                results.append((key, ACCEPTED, None, NOT_FOUND, None, False, None))
                continue
            n = children.get(key, 0) - released[key]
            if restrict and n > 0:
                existing[key] = found
                results.append(_rejected(key, HAS_CHILDREN, f"{n} record(s) still reference it"))
                continue
            seq, _attributes, refs = found
            if refs is not None:
                own = orjson.loads(refs).get(resource)
                if own is not None:
                    released[own] += 1
            deleted.append(seq)
            results.append((key, ACCEPTED, record_id(resource, seq), DELETED, None, False, None))
        if deleted:
            with self._transaction() as conn:
                conn.executemany(f"DELETE FROM {_table(resource)} WHERE seq = ?", [(s,) for s in deleted])
                conn.execute(
                    "UPDATE resources SET row_count = row_count - ? WHERE name = ?", (len(deleted), resource)
                )
            self._meta[resource][1] -= len(deleted)
        return results

    class _Transaction:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
            self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")

    def _transaction(self) -> HubStore._Transaction:
        return HubStore._Transaction(self.conn)

    def disk_bytes(self) -> int:
        """Bytes the store's files take on disk (database and write-ahead log)."""
        return sum(
            (self.directory / f"{DATABASE_FILE}{suffix}").stat().st_size
            for suffix in ("", "-wal")
            if (self.directory / f"{DATABASE_FILE}{suffix}").exists()
        )


# --- per-row checks and results (the contract's vocabulary) ----------------------------------------

ACCEPTED = "accepted"
REJECTED = "rejected"
CREATED = "created"
UPDATED = "updated"
UNCHANGED = "unchanged"
DELETED = "deleted"
NOT_FOUND = "not_found"
PARENT_MISSING = "parent_missing"
INVALID_RECORD = "invalid_record"
TRANSIENT_FAILURE = "transient_failure"
HAS_CHILDREN = "has_children"
MAX_EXTERNAL_KEY_LENGTH = 512
_SCALARS = (str, int, float, bool, type(None))


def validate(key: Any, attributes: Any, references: Any) -> str | None:
    """What is wrong with one record, or None (the per-value checks of an `invalid_record`)."""
    if not isinstance(key, str) or not key:
        return f"external_key must be a non-empty string, got {key!r}"
    if len(key) > MAX_EXTERNAL_KEY_LENGTH:
        return f"external_key longer than {MAX_EXTERNAL_KEY_LENGTH} characters"
    if not isinstance(attributes, dict):
        return "attributes must be an object"
    for name, value in attributes.items():
        if not isinstance(value, _SCALARS):
            return f"attribute {name!r} must be a string, number, boolean or null, got {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"attribute {name!r} is not a finite number: {value!r}"
    if not isinstance(references, dict):
        return "references must be an object"
    for parent, parent_key in references.items():
        if not RESOURCE_NAME.match(parent):
            return f"reference names unknown resource {parent!r}"
        if not isinstance(parent_key, str) or not parent_key:
            return f"reference to {parent!r} must be a non-empty external key, got {parent_key!r}"
    return None


def parent_missing_detail(parent: str, parent_key: str) -> str:
    return f"references {parent} {parent_key!r}, which ScheduleHub does not hold"


def _rejected(key: Any, reason: str, detail: str, *, retryable: bool = False) -> Result:
    return (key if isinstance(key, str) else None, REJECTED, None, None, reason, retryable, detail)

"""The ScheduleHub stand-in's wire forms: Arrow and JSON batches in, per-row results and records out.

A batch sent as Arrow is decided column by column when it can be
(`clean_rows`, `upsert_columns`); otherwise, and for JSON, it becomes rows for
the store's row-by-row path (`rows_from_arrow`). Results and read-back pages
answer in the form the client asked for (Accept: the Arrow stream or JSON).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from fastapi import HTTPException, Request, Response

from syncflow_dagster.simulators.arrow_json import (
    canonical_arrow,
    json_objects,
    json_references,
    objects_table,
)
from syncflow_dagster.simulators.hub_store import (
    ACCEPTED,
    MAX_EXTERNAL_KEY_LENGTH,
    REJECTED,
    RESOURCE_NAME,
    TRANSIENT_FAILURE,
    HubStore,
    Result,
    StoredRecord,
    records_of,
    validate,
)

ARROW_STREAM = "application/vnd.apache.arrow.stream"
JSON = "application/json"
REF_PREFIX = "ref."

_STRING: pa.DataType = pa.string()
RESULT_SCHEMA = pa.schema(
    {
        "external_key": _STRING,
        "status": _STRING,
        "id": _STRING,
        "outcome": _STRING,
        "reason_code": _STRING,
        "retryable": pa.bool_(),
        "detail": _STRING,
    }
)


def wants_arrow(request: Request) -> bool:
    return ARROW_STREAM in request.headers.get("accept", "")


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON, headers=headers)


def arrow_response(table: pa.Table, headers: Mapping[str, str] | None = None) -> Response:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM, headers=headers)


def _canonical_column(original: pa.ChunkedArray) -> list[Any]:
    """Python values of an Arrow column, with decimals/dates/times as canonical text."""
    values: list[Any] = canonical_arrow(original).to_pylist()
    return values


def rows_from_arrow(table: pa.Table) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
    if "external_key" not in table.column_names:
        raise HTTPException(
            status_code=400,
            detail={"error": "invalid_batch", "detail": "Arrow batch has no external_key column"},
        )
    keys = table.column("external_key").to_pylist()
    ref_names = [n for n in table.column_names if n.startswith(REF_PREFIX)]
    attr_names = [n for n in table.column_names if n != "external_key" and not n.startswith(REF_PREFIX)]
    ref_values = [table.column(n).to_pylist() for n in ref_names]
    attr_values = [_canonical_column(table.column(n)) for n in attr_names]
    parents = [n[len(REF_PREFIX) :] for n in ref_names]
    rows = []
    attr_rows = zip(*attr_values, strict=True) if attr_values else ([] for _ in keys)
    ref_rows = zip(*ref_values, strict=True) if ref_values else ([] for _ in keys)
    for key, attrs, refs in zip(keys, attr_rows, ref_rows, strict=True):
        rows.append(
            (
                key,
                dict(zip(attr_names, attrs, strict=True)),
                {p: v for p, v in zip(parents, refs, strict=True) if v is not None},
            )
        )
    return rows


def clean_rows(table: pa.Table) -> list[bool] | None:
    """Per row, whether it needs none of `validate`'s checks; None when a column needs them for every row.

    Arrow already guarantees most of what `validate` checks per value (every
    attribute is a scalar of one type); what is left is checked per column:
    key present and not too long, floats finite, references non-empty.
    """
    compute: Any = pc  # pyarrow's stubs do not type the kernels' array-and-scalar forms
    attr_names = [n for n in table.column_names if n != "external_key" and not n.startswith(REF_PREFIX)]
    ref_names = [n for n in table.column_names if n.startswith(REF_PREFIX)]
    if any(not RESOURCE_NAME.match(n[len(REF_PREFIX) :]) for n in ref_names):
        return None
    keys = table.column("external_key")
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        return None
    length = compute.utf8_length(keys)
    clean: Any = compute.and_(compute.greater(length, 0), compute.less_equal(length, MAX_EXTERNAL_KEY_LENGTH))
    for name in attr_names:
        kind = table.column(name).type
        if pa.types.is_floating(kind):
            clean = compute.and_kleene(
                clean,
                compute.or_kleene(compute.is_finite(table.column(name)), compute.is_null(table.column(name))),
            )
        elif pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_fixed_size_binary(kind):
            return None
    for name in ref_names:
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_null(column.type)):
            return None
        if pa.types.is_string(column.type):
            clean = compute.and_kleene(
                clean,
                compute.or_kleene(compute.is_null(column), compute.greater(compute.utf8_length(column), 0)),
            )
    return [bool(v) for v in compute.fill_null(clean, False).to_pylist()]


def upsert_columns(store: HubStore, resource: str, batch: pa.Table, clean: list[bool]) -> pa.Table | None:
    """The batch decided column by column, or None when it needs the row-by-row path.

    Row by row: a key sent twice (the later row sees the earlier one) or a
    reference into the batch's own resource (a parent earlier in the batch).
    """
    keys = batch.column("external_key").combine_chunks()
    if REF_PREFIX + resource in batch.column_names:
        return None
    if pc.count_distinct(keys, mode="all").as_py() != batch.num_rows:
        return None
    rejected: pa.Array | None = None
    if not all(clean):
        unclean = [i for i, ok in enumerate(clean) if not ok]
        problems = [validate(*row) for row in rows_from_arrow(batch.take(pa.array(unclean)))]
        if any(problem is None for problem in problems):
            return None  # a row the column checks flagged is valid after all: let the row path decide
        details: list[str | None] = [None] * batch.num_rows
        for index, problem in zip(unclean, problems, strict=True):
            details[index] = problem
        rejected = pa.array(details, pa.string())
    attr_names = [n for n in batch.column_names if n != "external_key" and not n.startswith(REF_PREFIX)]
    ref_names = [n for n in batch.column_names if n.startswith(REF_PREFIX)]
    parents = [n[len(REF_PREFIX) :] for n in ref_names]
    ref_columns = [batch.column(n).combine_chunks() for n in ref_names]
    attributes = json_objects(
        attr_names, [canonical_arrow(batch.column(n)) for n in attr_names], batch.num_rows
    )
    refs = json_references(parents, ref_columns, batch.num_rows)
    return store.upsert_columns(
        resource, keys, attributes, refs, dict(zip(parents, ref_columns, strict=True)), rejected
    )


def result_tuples(results: pa.Table) -> list[Result]:
    columns = [results.column(name).to_pylist() for name in RESULT_SCHEMA.names]
    return list(zip(*columns, strict=True))


def _result_json(result: Result) -> dict[str, Any]:
    key, status, rid, outcome, reason, retryable, detail = result
    if status == ACCEPTED:
        return {"external_key": key, "status": status, "id": rid, "outcome": outcome}
    return {
        "external_key": key,
        "status": status,
        "reason_code": reason,
        "retryable": retryable,
        "detail": detail,
    }


def _results_table(results: Sequence[Result]) -> pa.Table:
    columns = list(zip(*results, strict=True)) if results else [()] * len(RESULT_SCHEMA)
    return pa.Table.from_arrays(
        [pa.array(list(values), field.type) for values, field in zip(columns, RESULT_SCHEMA, strict=True)],
        schema=RESULT_SCHEMA,
    )


def results_response(request: Request, resource: str, results: Sequence[Result]) -> Response:
    if wants_arrow(request):
        return arrow_response(_results_table(results))
    summary: Counter[str] = Counter()
    for _key, status, _rid, outcome, reason, _retryable, _detail in results:
        summary[status] += 1
        summary[outcome or reason or ""] += 1
    return json_response(
        {"resource": resource, "summary": dict(summary), "results": [_result_json(r) for r in results]}
    )


def transient(key: Any) -> Result:
    return (
        key if isinstance(key, str) else None,
        REJECTED,
        None,
        None,
        TRANSIENT_FAILURE,
        True,
        "temporarily unavailable; retry",
    )


def record_json(resource: str, record: StoredRecord) -> dict[str, Any]:
    return {
        "id": record.id(resource),
        "external_key": record.external_key,
        "attributes": record.attributes,
        "references": record.references,
    }


def records_arrow(
    resource: str, seqs: list[int], keys: list[str], attributes: list[str], refs: list[str | None]
) -> pa.Table:
    """A read-back page as Arrow, its JSON texts parsed by Arrow's JSON reader (`records_table` when they do not fit)."""
    attribute_columns = objects_table(attributes)
    reference_columns = objects_table([r or "{}" for r in refs])
    if attribute_columns is None or reference_columns is None:
        return records_table(records_of(seqs, keys, attributes, refs), resource)
    compute: Any = pc  # pyarrow's stubs do not type the kernels' array-and-scalar forms
    ids = compute.binary_join_element_wise(
        f"sh_{resource}_", pc.cast(pa.array(seqs, pa.int64()), pa.string()), ""
    )
    columns: dict[str, Any] = {"id": ids, "external_key": pa.array(keys, pa.string())}
    for name in reference_columns.column_names:
        columns[REF_PREFIX + name] = reference_columns.column(name).cast(pa.string())
    for name in attribute_columns.column_names:
        columns[name] = attribute_columns.column(name)
    return pa.table(columns)


def records_table(page: list[StoredRecord], resource: str) -> pa.Table:
    attr_names: dict[str, None] = {}
    ref_names: dict[str, None] = {}
    for r in page:
        attr_names.update(dict.fromkeys(r.attributes))
        ref_names.update(dict.fromkeys(r.references))
    columns: dict[str, Any] = {
        "id": pa.array([r.id(resource) for r in page], pa.string()),
        "external_key": pa.array([r.external_key for r in page], pa.string()),
    }
    for parent in ref_names:
        columns[REF_PREFIX + parent] = pa.array([r.references.get(parent) for r in page], pa.string())
    for name in attr_names:
        values = [r.attributes.get(name) for r in page]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed kinds in one attribute (allowed by the JSON API): send text.
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)

"""The service's door into Dagster: launch, watch and cancel runs through the webserver's GraphQL API.

Launching goes through `dagster_graphql.DagsterGraphQLClient`, so the runs are
ordinary Dagster runs: queued by the instance's run coordinator (one run per
entity at a time, dagster.yaml), visible in the UI, retried by run retries.
Reading a run's details uses one small GraphQL query over httpx, because the
client only exposes the status. Errors become `DagsterUnavailable` (Dagster
cannot be reached: 503) or `DagsterRefused` (it answered no: 4xx/409).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from syncflow_dagster.clients.http import tls_verification

REPOSITORY = "__repository__"  # the implicit repository of a `Definitions`

_RUN_QUERY = """
query SyncflowRun($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { runId status jobName startTime endTime tags { key value } }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}
"""
_VERSION_QUERY = "query SyncflowPing { version }"
# A run's progress: which assets it materialised so far, with their integer metadata (row counts).
_PROGRESS_QUERY = """
query SyncflowRunProgress($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      runId status creationTime startTime endTime tags { key value }
      assetMaterializations {
        assetKey { path }
        metadataEntries { label ... on IntMetadataEntry { intValue } }
      }
    }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}
"""


class DagsterUnavailable(Exception):
    """Dagster's webserver could not be reached or failed internally."""


class DagsterRefused(Exception):
    """Dagster answered, and said no (unknown run, bad job, conflict)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


# A run launched from the UI's asset graph ("Materialize") runs Dagster's implicit asset job,
# which Dagster names `__ASSET_JOB` and offers no way to rename. It materializes the same stage
# assets as the `sync` job (defs/jobs.py), so SyncFlow reports it under that name.
IMPLICIT_ASSET_JOB = "__ASSET_JOB"
SYNC_JOB = "sync"


def job_shown(job_name: str) -> str:
    """The job name SyncFlow shows for a run: `sync` for the UI's implicit asset job."""
    return SYNC_JOB if job_name.startswith(IMPLICIT_ASSET_JOB) else job_name


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    job_name: str
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    tags: dict[str, str]

    @property
    def batch_run_id(self) -> str:
        """The run id SyncFlow files this run's batches under.

        A re-execution continues the batch of the run it re-executes (see
        `defs/assets.py`), which Dagster names in the `dagster/root_run_id` tag.
        """
        return self.tags.get(ROOT_RUN_ID_TAG) or self.run_id


@dataclass(frozen=True)
class RunProgress:
    """Where a run is: its status, times, and the integer metadata of each asset it materialised."""

    run_id: str
    status: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    materialized: dict[str, dict[str, int]]
    tags: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def retry_pending(self) -> bool:
        """A failed run that the daemon's run retries will retry (the retry may not exist yet)."""
        return self.status == "FAILURE" and self.tags.get(WILL_RETRY_TAG) == "true"

    @property
    def retried_by(self) -> str | None:
        """The run id of the automatic retry of this run, once the daemon launched it."""
        return self.tags.get(AUTO_RETRY_RUN_ID_TAG)


# Dagster's run statuses after which nothing more happens to a run.
TERMINAL_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
# Dagster's tags on a failed run that run retries will retry, and naming the retry once launched.
WILL_RETRY_TAG = "dagster/will_retry"
AUTO_RETRY_RUN_ID_TAG = "dagster/auto_retry_run_id"
# Dagster's tag on a re-execution naming the first run of its lineage.
ROOT_RUN_ID_TAG = "dagster/root_run_id"


@dataclass(frozen=True)
class Launched:
    entity: str
    run_id: str


@dataclass(frozen=True)
class Refused:
    entity: str
    detail: str
    unavailable: bool  # Dagster could not be reached (503), rather than said no (409)


def _timestamp(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, tz=dt.UTC)


class DagsterGateway:
    """Runs of the SyncFlow code location, via the Dagster webserver at `base_url`."""

    def __init__(self, base_url: str, location: str | None = "syncflow", timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"SYNCFLOW_DAGSTER_URL must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.graphql_url = f"{self.base_url}/graphql"
        self._location = location
        self._timeout_s = timeout_s
        self._parts = parts

    def _client(self) -> DagsterGraphQLClient:
        """A client of this call's own: the API serves requests on a thread pool, and one
        DagsterGraphQLClient holds one gql transport, which refuses a second caller while
        the first is connected (TransportAlreadyConnected), so shared it turns concurrent
        launches into 503s."""
        return DagsterGraphQLClient(
            self._parts.hostname or "",
            port_number=self._parts.port,
            use_https=self._parts.scheme == "https",
            timeout=int(self._timeout_s),
            path_prefix=self._parts.path.rstrip("/"),
        )

    def _submit(self, job: str, tags: dict[str, str], run_config: dict[str, Any] | None = None) -> str:
        try:
            return self._client().submit_job_execution(
                job,
                repository_location_name=self._location,
                repository_name=REPOSITORY if self._location else None,
                run_config=run_config,
                tags=tags,
            )
        except DagsterGraphQLClientError as exc:
            raise _translate(exc) from None

    def submit_sync_run(self, tags: dict[str, str]) -> str:
        """Launch the sync job with `tags` (a partition or a partition range, built by service/launch.py)."""
        from syncflow_dagster.defs.jobs import sync_job

        return self._submit(sync_job.name, tags)

    def submit_retry(
        self,
        entity: str,
        *,
        include_permanent: bool = False,
        include_dead: bool = False,
        trigger: str = "api",
    ) -> str:
        """Launch the retry job (failed records due, released children) for one entity; the run id.

        One run per entity, tagged `syncflow/entity`: the run queue's per-entity
        limit then keeps it from overlapping a sync of that entity.
        """
        # Names come from the job definitions themselves, so a rename cannot break the API.
        from syncflow_dagster.defs.jobs import entity_run_tags, retry_job
        from syncflow_dagster.defs.maintenance import retry_failed_and_pending

        options = {"entities": [entity], "include_permanent": include_permanent, "include_dead": include_dead}
        config = {"ops": {retry_failed_and_pending.name: {"config": options}}}
        return self._submit(retry_job.name, entity_run_tags(entity, trigger), config)

    def submit_reconcile(self, entity: str, *, dry_run: bool = False, trigger: str = "api") -> str:
        """Launch the reconcile job (full key scan, guarded deletes) for one entity; the run id."""
        from syncflow_dagster.defs.jobs import entity_run_tags, reconcile_job
        from syncflow_dagster.defs.maintenance import reconcile_entities

        config = {"ops": {reconcile_entities.name: {"config": {"entities": [entity], "dry_run": dry_run}}}}
        return self._submit(reconcile_job.name, entity_run_tags(entity, trigger), config)

    def submit_each(
        self, entities: list[str], submit: Callable[[str], str]
    ) -> tuple[list[Launched], list[Refused]]:
        """`submit(entity)` for every entity; what was launched and what was not, with why.

        A refusal does not stop the others and no run id already given is lost:
        the caller reports both lists. Once Dagster cannot be reached, the
        entities not yet submitted are reported with that reason instead of
        each waiting out the timeout again (as launch.launch does for syncs).
        """
        launched: list[Launched] = []
        refused: list[Refused] = []
        unavailable: str | None = None
        for entity in entities:
            if unavailable is not None:
                refused.append(Refused(entity, f"not submitted: {unavailable}", True))
                continue
            try:
                launched.append(Launched(entity, submit(entity)))
            except DagsterUnavailable as exc:
                unavailable = f"Dagster unavailable ({exc})"
                refused.append(Refused(entity, unavailable, True))
            except DagsterRefused as exc:
                refused.append(Refused(entity, str(exc), False))
        return launched, refused

    def cancel(self, run_id: str) -> None:
        self.run(run_id)  # an unknown run is a 404, not an error of the terminate mutation
        try:
            self._client().terminate_run(run_id)
        except DagsterGraphQLClientError as exc:
            raise _translate(exc) from None

    def _run_or_error(self, query: str, run_id: str) -> dict[str, Any]:
        """`runOrError` of `query` for the run: its fields, or 404-like / 503-like errors."""
        data: dict[str, Any] = self._graphql(query, {"runId": run_id})["runOrError"]
        kind = data["__typename"]
        if kind == "RunNotFoundError":
            raise DagsterRefused(kind, f"run {run_id!r} not found")
        if kind != "Run":
            raise DagsterUnavailable(f"Dagster could not read run {run_id!r}: {kind}")
        return data

    def run(self, run_id: str) -> RunInfo:
        data = self._run_or_error(_RUN_QUERY, run_id)
        return RunInfo(
            run_id=data["runId"],
            status=data["status"],
            job_name=job_shown(data["jobName"]),
            started_at=_timestamp(data.get("startTime")),
            ended_at=_timestamp(data.get("endTime")),
            tags={t["key"]: t["value"] for t in data.get("tags") or []},
        )

    def progress(self, run_id: str) -> RunProgress:
        """The run's status and what it materialised so far (asset name -> integer metadata)."""
        data = self._run_or_error(_PROGRESS_QUERY, run_id)
        materialized: dict[str, dict[str, int]] = {}
        for event in data.get("assetMaterializations") or []:
            name = "/".join(event["assetKey"]["path"])
            materialized[name] = {
                entry["label"]: int(entry["intValue"])
                for entry in event.get("metadataEntries") or []
                if entry.get("intValue") is not None
            }
        return RunProgress(
            run_id=data["runId"],
            status=data["status"],
            created_at=float(data["creationTime"]),
            started_at=data.get("startTime"),
            ended_at=data.get("endTime"),
            materialized=materialized,
            tags={t["key"]: t["value"] for t in data.get("tags") or []},
        )

    def ping(self) -> tuple[str, float]:
        """Dagster's version and the round trip in seconds."""
        started = time.perf_counter()
        version = self._graphql(_VERSION_QUERY, {})["version"]
        return str(version), time.perf_counter() - started

    def _graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        try:
            response = httpx.post(
                self.graphql_url,
                json={"query": query, "variables": variables},
                timeout=self._timeout_s,
                verify=tls_verification(True),
            )
        except httpx.HTTPError as exc:
            raise DagsterUnavailable(
                f"Dagster at {self.base_url} unreachable ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise DagsterUnavailable(f"Dagster at {self.base_url} answered HTTP {response.status_code}")
        body = response.json()
        if body.get("errors"):
            raise DagsterUnavailable(f"Dagster GraphQL error: {body['errors'][0].get('message', '?')[:200]}")
        data: dict[str, Any] = body["data"]
        return data


def _translate(exc: DagsterGraphQLClientError) -> Exception:
    kind = str(exc.args[0]) if exc.args else "DagsterGraphQLClientError"
    message = str(exc.args[1]) if len(exc.args) > 1 else ""
    if "connecting to url" in kind or kind.startswith(("Server error", "Exception occured")):
        # The client hides the transport's exception (a timeout, a refused
        # connection) in __cause__; its type, never its text, says which.
        cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        return DagsterUnavailable(kind.splitlines()[0][:200] + cause)
    return DagsterRefused(kind, message[:500])

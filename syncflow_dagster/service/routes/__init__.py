"""The API's routes, one APIRouter a subject; `create_app` includes them in this order."""

from syncflow_dagster.service.routes import failed, jobs, operations, state, sync

ROUTERS = (sync.router, state.router, failed.router, jobs.router, operations.router)

__all__ = ["ROUTERS"]

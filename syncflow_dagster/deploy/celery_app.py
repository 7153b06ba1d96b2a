"""The Celery app SyncFlow's workers run: `celery -A syncflow_dagster.deploy.celery_app worker`.

It is dagster-celery's own app (its step task, `execute_plan`) built from the
same SYNCFLOW_CELERY_* variables as the executor, so the workers listen on the
broker, backend and queue the runs publish to. Nothing else runs here.
"""

from __future__ import annotations

import os

from celery import Celery
from dagster._core.execution.retries import RetryMode
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task
from kombu import Exchange, Queue

from syncflow_dagster.deploy.executor import celery_app_args, executor_settings

# dagster-celery's task priorities go up to 10 on its queues; ours keep that.
MAX_PRIORITY = 10


def build_worker_app() -> Celery:
    """dagster-celery's app, consuming only SyncFlow's queue (bound so the executor's routing key reaches it)."""
    # The worker process's own edge: its environment is the deployment's (docs/scaling.md).
    settings = executor_settings(os.environ)
    args = celery_app_args(settings)
    app_args = CeleryExecutor(
        retries=RetryMode(RetryMode.DISABLED),
        broker=args["broker"],
        backend=args["backend"],
        config_source=args["config_source"],
    ).app_args()
    app = make_app(app_args)
    queue = settings.celery_queue
    app.conf.task_queues = [
        Queue(
            queue,
            Exchange(queue, type="topic"),
            routing_key=f"{queue}.#",
            queue_arguments={"x-max-priority": MAX_PRIORITY},
        )
    ]
    return app


app = build_worker_app()
execute_plan = create_task(app)

"""SyncFlow: change-only, parent-first sync of ERP records from APISmith into ScheduleHub, on Dagster."""

__version__ = "0.1.0"

"""SyncFlow simulators layer."""

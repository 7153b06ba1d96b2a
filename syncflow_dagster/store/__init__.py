"""SyncFlow store layer."""

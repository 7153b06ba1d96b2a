"""SyncFlow cli layer."""

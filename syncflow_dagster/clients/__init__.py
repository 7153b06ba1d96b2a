"""SyncFlow clients layer."""

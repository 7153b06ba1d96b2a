"""SyncFlow defs layer."""

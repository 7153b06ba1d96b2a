"""SyncFlow service layer."""

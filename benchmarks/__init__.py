"""SyncFlow's benchmarks: `python -m benchmarks <name> ...` (see docs/benchmarks.md)."""

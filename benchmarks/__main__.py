"""Dispatch `python -m benchmarks <name> [options]` to a registered benchmark.

Each benchmark is a module with `main(argv: list[str]) -> int`; registering one
is one line in BENCHMARKS. Modules are imported only when chosen, so one
benchmark's dependencies never slow down or break another.
"""

from __future__ import annotations

import importlib
import sys

# name → module holding `main(argv) -> int`
BENCHMARKS: dict[str, str] = {
    "daemon": "benchmarks.daemon",
    "datetimes": "benchmarks.normalize_datetimes",
    "e2e": "benchmarks.e2e",
    "engine": "benchmarks.engine",
    "history": "benchmarks.history",
    "standins": "benchmarks.standins",
    "transport": "benchmarks.transport",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        print(f"usage: python -m benchmarks <benchmark> [options]; benchmarks: {names}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    result: int = module.main(argv[1:])
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""`python -m syncflow_dagster.catalog reference`: print docs/catalog.md, generated from the models."""

from __future__ import annotations

import sys

from syncflow_dagster.catalog.reference import reference


def main(argv: list[str]) -> int:
    if argv != ["reference"]:
        print("usage: python -m syncflow_dagster.catalog reference > docs/catalog.md", file=sys.stderr)
        return 2
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

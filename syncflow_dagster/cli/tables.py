"""How the `syncflow` commands print: tables that fit 80 columns, `--json` for scripts, keys you can read.

* Tables have no borders and one space between columns; numbers are short
  (`12.3k`, `1.2M`; `--json` has the exact values); text that does not fit
  wraps rather than being cut.
* A composite business key is printed with `KEY_SEPARATOR_SHOWN` (␟) between
  its parts; SyncFlow keeps it with the invisible unit separator (0x1f), which
  a terminal does not show. Commands that take a key accept it with ␟ or as
  its parts.
* `--json` prints one JSON document (UTC ISO-8601 times, keys as their parts
  and their text) and nothing else on stdout.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from syncflow_dagster.catalog.models import KEY_SEPARATOR, KEY_SEPARATOR_SHOWN

WIDTH = 80


def shown_key(bk: str | None) -> str:
    """A business key with its parts visibly separated: `WO-0728␟10`."""
    return "-" if bk is None else bk.replace(KEY_SEPARATOR, KEY_SEPARATOR_SHOWN)


def key_parts(bk: str | None) -> list[str]:
    return [] if bk is None else bk.split(KEY_SEPARATOR)


def stored_key(parts: Sequence[str]) -> str:
    """The key text SyncFlow stores, from what a user typed: parts, or one text with ␟ between them."""
    joined = KEY_SEPARATOR.join(parts)
    return joined.replace(KEY_SEPARATOR_SHOWN, KEY_SEPARATOR)


def short(n: int | float | None) -> str:
    """A count in at most five characters: 987, 12.3k, 1.2M."""
    if n is None:
        return "-"
    value = float(n)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return f"{scaled:.1f}{suffix}" if abs(scaled) < 100 else f"{scaled:.0f}{suffix}"
    return str(int(value)) if value == int(value) else f"{value:.1f}"


def when(value: dt.datetime | None, *, seconds: bool = False) -> str:
    """UTC time as `2026-01-05 10:12` (or with seconds); `-` for none."""
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def table(*columns: str, title: str | None = None, right: Sequence[str] = ()) -> Table:
    """A borderless table, one space between columns; `right` columns are right-aligned (numbers)."""
    grid = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        collapse_padding=True,
    )
    for name in columns:
        grid.add_column(name, justify="right" if name in right else "left", overflow="fold")
    return grid


def console() -> Console:
    """The console commands print to: the terminal's width, never wider than needed."""
    return Console(highlight=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    return value


def print_json(document: Any) -> None:
    """One JSON document on stdout (no colours, no wrapping), for scripts."""
    print(json.dumps(_plain(document), ensure_ascii=False, sort_keys=False, indent=2))

"""One column after its coercion layers: typed values and the (mask, reason) of each bad value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as _compute

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute


@dataclass
class Coerced:
    """One column after its layers: typed values and the (mask, reason) of each bad value."""

    values: pa.Array
    problems: list[tuple[pa.Array, pa.Array | str]]

    def reject(self, mask: pa.Array, reason: pa.Array | str | Callable[[], pa.Array]) -> None:
        """Record bad values; a per-value reason is built only when some value is bad."""
        mask = pc.fill_null(mask, False)
        if pc.any(mask).as_py():
            self.problems.append((mask, reason() if callable(reason) else reason))


def empty_to_null(text: pa.Array) -> pa.Array:
    """Empty strings as null (a field with nothing in it has no value)."""
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text)

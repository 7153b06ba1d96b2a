"""SyncFlow defs layer.

Dagster warns, once per process, about every beta, preview or superseded API a
definition uses (`owners` on sensors and assets, ...): repeated by the code
server and every run worker, that was nearly two hundred lines in a morning of
`syncflow dev`, none of them actionable by a user. The choice to use those APIs
is ours and pinned with the Dagster version, so the warnings are filtered here,
before any definition is built. Dagster's deprecation warnings are kept.
"""

import warnings

import dagster as dg

for _category in (dg.BetaWarning, dg.PreviewWarning, dg.SupersessionWarning):
    warnings.filterwarnings("ignore", category=_category)

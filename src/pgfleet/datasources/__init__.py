"""Built-in datasources: one module per metric family, SQL in ``sql/``.

A datasource's source query returns ``ts timestamptz`` (when the statistics
were read) and then the declared columns, in order; the declaration says what
each column *is*, so the repository's generic
metric machinery (``pgfleet.create_metric_source``) knows how to store it:

- ``key``: identifies an entry (a database, a statement, a table...).
- ``counter``: cumulative since the last reset; stored as a reset-safe delta.
- ``delta``: already a per-snapshot delta (the source resets it itself).
- ``gauge``: a current value; stored only when it changed.
- ``once``: an attribute fixed for an entry (a query text): stored once per key.
- ``epoch``: changes when the entry's counters restarted (``stats_reset``).
- ``export``: read for the Prometheus exporter only: staged with the rest (the
  transient table has it) but never stored.  For values that move at every
  snapshot and that no chart reads from the history (pg_stat_statements's
  min/max/stddev over the entry's life: stored as gauges, they took ~45 more
  bytes per statement-point, nearly doubling the history).

The SQL runs with ``search_path`` pinned to ``pg_catalog, pg_temp`` (see
:mod:`pgfleet.connections`), and means the same without: built-in functions
(aggregates too), catalogs and types named by the parser are written
``pg_catalog.``-qualified, and an extension's objects ``@extschema:NAME@.object``,
replaced by the schema extension NAME lives in, in each database (a database
without it simply has nothing for that source).  Operators are written plainly
but always get operands of exactly the types of a pg_catalog operator (cast
where needed, ``pg_catalog.format()`` rather than ``text || integer``): an
operator elsewhere could then win only on a path naming its schema before
pg_catalog, never by matching better.  tests/datasources/test_qualified.py
checks the names; docs/security.md says why.

Secrets never leave the server: the SQL itself replaces them (settings.sql,
pg_stat_statements*.sql, pg_qualstats.sql; docs/security.md lists what each
source sends).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

Kind = Literal["key", "counter", "delta", "gauge", "once", "epoch", "export"]

KINDS: tuple[str, ...] = ("key", "counter", "delta", "gauge", "once", "epoch", "export")

# An extension's schema in source SQL: @extschema:NAME@ (PostgreSQL's own
# notation in extension scripts).
EXTSCHEMA = re.compile(r"@extschema:([A-Za-z0-9_]+)@")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a PostgreSQL type name, as used in the repository tables
    kind: Kind


@dataclass(frozen=True)
class Datasource:
    """One metric family, collected through the registry contract."""

    module: str
    columns: tuple[Column, ...]
    # server_version_num threshold -> SQL file in sql/; the highest threshold
    # not above the server's version wins.  A version below every threshold
    # means the source does not exist there (e.g. pg_stat_io before 16).
    queries: dict[int, str]
    extension: str | None = None
    per_database: bool = False
    on_standby: bool = True
    priority: int = 10
    # SQL run on the monitored server right after the source query.
    cleanup: str | None = None
    # Key column whose value bounds "vanished entry" detection: an entry is only
    # considered gone if another entry with the same scope value was seen.
    scope: str | None = None
    # Rows that grow with the workload (thousands of statements): a one-shot
    # snapshot COPYs them into the repository while the server still sends
    # them (see collector.snapshot_remote).  At most one such source streams.
    streamed: bool = False
    # The columns naming an entry in the history, if not its keys: keys or
    # once-columns; the entries sharing them are summed (counters and deltas
    # only).  See migration 0012 and docs/datasources.md.
    history_keys: tuple[str, ...] | None = None
    description: str = field(default="", compare=False)

    @property
    def src_function(self) -> str:
        return f"pgfleet.{self.module}_src"

    @property
    def tmp_table(self) -> str:
        return f"pgfleet.{self.module}_src_tmp"

    def names(self, kind: Kind) -> list[str]:
        return [c.name for c in self.columns if c.kind == kind]

    def query_for(self, server_version_num: int) -> str | None:
        """Return the source SQL for a server version, or None if not available."""
        eligible = [v for v in self.queries if v <= server_version_num]
        if not eligible:
            return None
        return load_sql(self.queries[max(eligible)])


@functools.cache
def load_sql(name: str) -> str:
    text = resources.files(__package__).joinpath("sql", name).read_text(encoding="utf-8")
    return text.strip().rstrip(";")


@functools.cache
def builtin() -> dict[str, Datasource]:
    """Every built-in datasource, keyed by module name, in priority order."""
    found: list[Datasource] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        ds = getattr(mod, "DATASOURCE", None)
        if isinstance(ds, Datasource):
            found.append(ds)
    found.sort(key=lambda d: (d.priority, d.module))
    return {d.module: d for d in found}

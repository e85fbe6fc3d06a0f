"""functions.sql, the readable current definition of every repository function.

It is generated from the migrations, never applied: these tests make sure it
was regenerated after a migration changed, and that what it leaves out is
only the functions each datasource gets at install time.
"""

from __future__ import annotations

import re

import pytest

from pgfleet.cluster import Cluster
from pgfleet.datasources import builtin
from pgfleet.repository import functions
from tests.fix_clusters import NewDatabase
from tests.fix_repository import connect, new_repository


def test_functions_sql_is_current(pg18: Cluster, new_database: NewDatabase) -> None:
    with connect(new_database(pg18)) as conn:
        dumped = functions.dump(conn)
    shipped = functions.FILE.read_text(encoding="utf-8") if functions.FILE.exists() else ""
    if dumped != shipped:
        old, new = shipped.splitlines(), dumped.splitlines()
        line = next(
            (i for i, (a, b) in enumerate(zip(old, new, strict=False), 1) if a != b),
            min(len(old), len(new)) + 1,
        )
        pytest.fail(
            f"src/pgfleet/repository/functions.sql does not match the migrations (line {line}): "
            f"regenerate it with `{functions.COMMAND}` (DSN: a PostgreSQL 18 database "
            "without schema pgfleet)",
            pytrace=False,
        )


def test_left_out_only_per_source_functions(pg18: Cluster, new_database: NewDatabase) -> None:
    """A repository holds the dumped functions, plus per-source ones the footer names."""
    text = functions.FILE.read_text(encoding="utf-8")
    dumped = set(re.findall(r"^CREATE OR REPLACE FUNCTION pgfleet\.(\w+)\(", text, re.M))
    suffixes = {
        s for line in re.findall(r"^--   [^:]+: (_.+)$", text, re.M) for s in line.split(", ")
    }
    assert "metric_snapshot_body" in dumped and "_snapshot" in suffixes and "_src" in suffixes

    with connect(new_repository(pg18, new_database)) as conn:
        have = {
            r[0]
            for r in conn.execute(
                "SELECT proname::text FROM pg_proc WHERE pronamespace = 'pgfleet'::regnamespace"
            )
        }
    assert dumped <= have
    generated = re.compile(
        f"({'|'.join(map(re.escape, builtin()))})({'|'.join(map(re.escape, suffixes))})"
    )
    assert sorted(n for n in have - dumped if not generated.fullmatch(n)) == []

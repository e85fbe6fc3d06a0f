"""fetch() asks the server for each source's rows as one COPY-text value
(agg_stmt): they must be what ``COPY ... TO STDOUT`` writes, byte for byte,
whatever the names and values hold."""

from __future__ import annotations

import io

import psycopg
import pytest
from psycopg import sql

from pgfleet.cluster import Cluster
from pgfleet.datasources import builtin
from pgfleet.snapshot.fetch import _copy_stmt, agg_stmt, qualify
from tests.fix_clusters import NewDatabase

# Their rows change as we read them: our own statements, sessions, samples.
_MOVING = {"pg_stat_statements", "pg_stat_kcache", "pg_stat_activity", "pg_wait_sampling"}
# Tab, newline, carriage return, backslash, and what COPY writes for NULL.
_AWKWARD = 'we\\ird\ttab\nnew\rline \\N "q"'


@pytest.mark.parametrize("cluster", ["pg18", "pg15"])
def test_one_value_per_source_is_what_copy_writes(
    request: pytest.FixtureRequest, new_database: NewDatabase, cluster: str
) -> None:
    server: Cluster = request.getfixturevalue(cluster)
    dsn = new_database(server)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(_AWKWARD)))
        table = sql.Identifier(_AWKWARD, _AWKWARD)
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(table))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, NULL)").format(table))
        conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
        conn.execute("ANALYZE")
        version = conn.info.server_version
        schemas: dict[str, str] = dict(
            conn.execute(
                "SELECT e.extname::text, pg_catalog.quote_ident(n.nspname::text)"
                " FROM pg_catalog.pg_extension e"
                " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
            ).fetchall()
        )
        compared: dict[str, bytes] = {}
        for ds in builtin().values():
            query = ds.query_for(version)
            if query is None or ds.module in _MOVING:
                continue
            query = qualify(query, schemas)
            if query is None:
                continue
            # One snapshot of the statistics for both reads.
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                conn.execute("SET LOCAL stats_fetch_consistency = snapshot")
                out = io.BytesIO()
                with conn.cursor().copy(_copy_stmt(7, sql.SQL(query))) as copy:
                    for data in copy:
                        out.write(data)
                cur = conn.cursor(binary=False)
                cur.execute(agg_stmt(7, ds, query))
                row = cur.fetchone()
            assert row is not None
            value = b"" if row[0] is None else row[0].encode() + b"\n"
            # The same rows (string_agg keeps the scan's order; COPY too, but
            # neither promises it).
            assert sorted(value.splitlines()) == sorted(out.getvalue().splitlines()), ds.module
            compared[ds.module] = value
        assert {"pg_stat_user_tables", "pg_stat_user_indexes", "settings"} <= set(compared)
        # The awkward names went through, escaped as COPY escapes them.
        escaped = b"we\\\\ird\\ttab\\nnew\\rline \\\\N"
        assert escaped in compared["pg_stat_user_tables"]

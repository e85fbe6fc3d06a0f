"""Install the built-in datasources through the same contract as a user's own.

For each built-in :class:`~pgfleet.datasources.Datasource` this creates its
transient table ``pgfleet.<module>_src_tmp`` (UNLOGGED, ``srvid`` first), its
query_source function ``pgfleet.<module>_src(srvid)`` -- local data for srvid 0
(the SQL variant for the repository's own PostgreSQL version), the staged rows
otherwise -- and then lets ``pgfleet.create_metric_source`` build the storage
and register the four operations.  Everything is idempotent, so ``repo
upgrade`` reruns it: a source that gained a column gains it in place.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgfleet.datasources import Datasource, builtin


def install_builtin(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
    assert row is not None
    version = int(row[0])
    for ds in builtin().values():
        install(conn, ds, version)


def install(conn: psycopg.Connection[Any], ds: Datasource, version: int) -> None:
    tmp = sql.SQL(ds.tmp_table)  # module names are validated identifiers
    conn.execute(
        sql.SQL(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {} "
            "(srvid integer NOT NULL, ts timestamptz NOT NULL)"
        ).format(tmp)
    )
    for col in ds.columns:
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                tmp, sql.Identifier(col.name), sql.SQL(col.type)
            )
        )
    # Dropped first: a source whose columns changed changes the function's
    # result type, which CREATE OR REPLACE refuses.  Nothing depends on it
    # but the snapshot function, which names it in a string.
    conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}(integer)").format(sql.SQL(ds.src_function)))
    conn.execute(_src_function(ds, version))
    epoch = ds.names("epoch")
    conn.execute(
        """SELECT pgfleet.create_metric_source(
               %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, false)""",
        (
            ds.module,
            ds.src_function,
            ds.names("key"),
            ds.names("counter"),
            ds.names("delta"),
            ds.names("gauge"),
            ds.names("once"),
            epoch[0] if epoch else None,
            ds.scope,
            ds.priority,
            ds.cleanup,
        ),
    )


def _src_function(ds: Datasource, version: int) -> sql.Composed:
    cols = [sql.Identifier("ts"), *(sql.Identifier(c.name) for c in ds.columns)]
    outputs = sql.SQL(", ").join(
        [
            sql.SQL("ts timestamptz"),
            *(sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type)) for c in ds.columns),
        ]
    )
    # Casts make the local SQL's result match the declared types exactly, as
    # RETURN QUERY demands (COPY in remote mode casts by itself).
    casted = sql.SQL(", ").join(
        [
            sql.SQL("s.ts::timestamptz"),
            *(
                sql.SQL("s.{}::{}").format(sql.Identifier(c.name), sql.SQL(c.type))
                for c in ds.columns
            ),
        ]
    )
    local = ds.query_for(version)
    if local is None:
        local_branch = sql.SQL("RAISE EXCEPTION {};").format(
            sql.Literal(f"{ds.module} is not available on PostgreSQL {version // 10000}")
        )
    else:
        local_branch = sql.SQL("RETURN QUERY EXECUTE {};").format(
            sql.Literal(f"SELECT {casted.as_string(None)} FROM ({local}) s")
        )
    return sql.SQL(
        """CREATE OR REPLACE FUNCTION {fn}(_srvid integer)
RETURNS TABLE ({outputs}) LANGUAGE plpgsql AS $src$
BEGIN
    IF _srvid = 0 THEN
        {local_branch}
    ELSE
        RETURN QUERY SELECT {cols} FROM {tmp} t WHERE t.srvid = _srvid;
    END IF;
END;
$src$"""
    ).format(
        fn=sql.SQL(ds.src_function),
        outputs=outputs,
        local_branch=local_branch,
        cols=sql.SQL(", ").join(sql.SQL("t.{}").format(c) for c in cols),
        tmp=sql.SQL(ds.tmp_table),
    )

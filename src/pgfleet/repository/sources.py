"""Install the built-in datasources through the same contract as a user's own.

For each built-in :class:`~pgfleet.datasources.Datasource` this creates its
transient table ``pgfleet.<module>_src_tmp`` (UNLOGGED, ``srvid`` first), its
query_source function ``pgfleet.<module>_src(srvid)`` -- local data for srvid 0
(the SQL variant for the repository's own PostgreSQL version), the staged rows
otherwise -- and then lets ``pgfleet.create_metric_source`` build the storage
and register the four operations.  Everything is idempotent, so ``repo
upgrade`` reruns it: a source that gained a column gains it in place.

Like every repository function (migration 0009), the query_source functions
run with ``search_path = pg_catalog, pg_temp``, the path the collector's
sessions have on a monitored server, where the same SQL runs.  The install
itself runs with that path too, whatever the session's: the type names of
the tables and functions it creates (``text``, ``timestamptz``) are
PostgreSQL's, not those of whoever may create objects in a schema on the
session's path.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgfleet.datasources import EXTSCHEMA, Datasource, builtin

# The path of every repository function and of the collector's sessions.
SEARCH_PATH = "pg_catalog, pg_temp"


def install_builtin(conn: psycopg.Connection[Any]) -> None:
    """Install (or upgrade) every built-in source, in the caller's transaction."""
    with conn.transaction():
        # set_config(..., true) lasts until the end of the transaction: put
        # the session's path back for whatever the caller does after us.
        row = conn.execute(
            "SELECT pg_catalog.current_setting('search_path'),"
            " pg_catalog.set_config('search_path', %s, true),"
            " pg_catalog.current_setting('server_version_num')::integer",
            (SEARCH_PATH,),
        ).fetchone()
        assert row is not None
        saved, _, version = row
        for ds in builtin().values():
            install(conn, ds, int(version))
        conn.execute("SELECT pg_catalog.set_config('search_path', %s, true)", (saved,))


# Built-in sources whose every column is short (names, numbers, times): their
# transient table stores all of it inline (STORAGE PLAIN) and so has no TOAST
# table.  Every snapshot TRUNCATEs the transient tables it used, which gives
# each of them new files: a TOAST table and its index triple the files made
# and unlinked per snapshot.  The others (query texts, setting values,
# function signatures) keep their TOAST table.
SHORT_ROWS = frozenset(
    {
        "database_size",
        "pg_locks",
        "pg_stat_activity",
        "pg_stat_archiver",
        "pg_stat_bgwriter",
        "pg_stat_database",
        "pg_stat_io",
        "pg_stat_kcache",
        "pg_stat_progress_vacuum",
        "pg_stat_user_indexes",
        "pg_stat_user_tables",
        "pg_stat_wal",
        "pg_wait_sampling",
        "postmaster",
        "replication",
        "replication_slots",
        "wal_receiver",
    }
)


def install(conn: psycopg.Connection[Any], ds: Datasource, version: int) -> None:
    tmp = sql.SQL(ds.tmp_table)  # module names are validated identifiers
    plain = ds.module in SHORT_ROWS
    row = conn.execute(
        "SELECT reltoastrelid <> 0 FROM pg_class WHERE oid = to_regclass(%s)", (ds.tmp_table,)
    ).fetchone()
    if row is not None and row[0] and plain:
        # Made before it could go without TOAST: it is empty outside a
        # snapshot's transaction, so make it again.
        conn.execute(sql.SQL("DROP TABLE {}").format(tmp))
    # Always empty outside a snapshot's transaction: nothing for autovacuum
    # to do, and its locks would only make the snapshot's TRUNCATE wait.
    conn.execute(
        sql.SQL(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {} "
            "(srvid integer NOT NULL, ts timestamptz NOT NULL) "
            "WITH (autovacuum_enabled = false)"
        ).format(tmp)
    )
    conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(tmp))
    for col in ds.columns:
        # One ALTER TABLE: the TOAST table is decided after all its
        # subcommands, so a PLAIN column never makes one.
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}{}").format(
                tmp,
                sql.Identifier(col.name),
                sql.SQL(col.type),
                sql.SQL(", ALTER COLUMN {} SET STORAGE PLAIN").format(sql.Identifier(col.name))
                if plain
                else sql.SQL(""),
            )
        )
    # Dropped first: a source whose columns changed changes the function's
    # result type, which CREATE OR REPLACE refuses.  Nothing depends on it
    # but the snapshot function, which names it in a string.
    conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}(integer)").format(sql.SQL(ds.src_function)))
    conn.execute(_src_function(ds, version))
    epoch = ds.names("epoch")
    args: list[Any] = [
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
        False,
    ]
    # History keys came with migration 0012; a repository installed at an
    # older version (upgrade tests stop the migrations half-way) has none.
    row = conn.execute(
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_proc"
        " WHERE oid = 'pgfleet.create_metric_source'::regproc AND pronargs = 13"
    ).fetchone()
    if row and row[0]:
        args.append(list(ds.history_keys) if ds.history_keys is not None else None)
    conn.execute(
        sql.SQL("SELECT pgfleet.create_metric_source({})").format(
            sql.SQL(", ").join(sql.Placeholder() * len(args))
        ),
        args,
    )
    # The extension it needs, for the per-server unregistration when the
    # extension goes (migration 0015; older repositories have no table).
    row = conn.execute("SELECT to_regclass('pgfleet.source_extensions') IS NOT NULL").fetchone()
    if ds.extension and row and row[0]:
        conn.execute(
            "INSERT INTO pgfleet.source_extensions (module, extension) VALUES (%s, %s)"
            " ON CONFLICT (module) DO UPDATE SET extension = excluded.extension",
            (ds.module, ds.extension),
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
        # An extension's objects are written @extschema:NAME@.object (see
        # snapshot.fetch.qualify): qualified at call time with the schema the
        # extension is in then, as the collector does on a monitored server.
        steps = [
            sql.SQL(
                "_q := replace(_q, {}, (SELECT pg_catalog.quote_ident(n.nspname)"
                " FROM pg_catalog.pg_extension e"
                " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
                " WHERE e.extname = {}));"
            ).format(sql.Literal(f"@extschema:{ext}@"), sql.Literal(ext))
            for ext in sorted(set(EXTSCHEMA.findall(local)))
        ]
        local_branch = sql.SQL("_q := {};\n        {}\n        RETURN QUERY EXECUTE _q;").format(
            sql.Literal(f"SELECT {casted.as_string(None)} FROM ({local}) s"),
            sql.SQL("\n        ").join(steps),
        )
    return sql.SQL(
        """CREATE OR REPLACE FUNCTION {fn}(_srvid integer)
RETURNS TABLE ({outputs}) LANGUAGE plpgsql SET search_path = {path} AS $src$
DECLARE
    _q text;
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
        path=sql.SQL(SEARCH_PATH),
        local_branch=local_branch,
        cols=sql.SQL(", ").join(sql.SQL("t.{}").format(c) for c in cols),
        tmp=sql.SQL(ds.tmp_table),
    )

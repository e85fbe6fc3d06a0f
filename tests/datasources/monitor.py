"""Running built-in sources as the collector does: a pg_monitor role, the
collector's pinned search_path, extensions' schemas filled in."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgfleet.cluster import Cluster
from pgfleet.snapshot.fetch import qualify

MONITOR = "pgfleet_ds_monitor"
MONITOR_PASSWORD = "pgfleet-ds-monitor-secret"

# What connections.server_conninfo puts in every monitored session's options.
PINNED = "-c search_path=pg_catalog,pg_temp"


def ensure_monitor_role(cluster: Cluster) -> None:
    """The role the sources run as: pg_monitor and nothing else."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (MONITOR,)).fetchone()
        stmt = "ALTER ROLE {} LOGIN PASSWORD {}" if exists else "CREATE ROLE {} LOGIN PASSWORD {}"
        conn.execute(sql.SQL(stmt).format(sql.Identifier(MONITOR), sql.Literal(MONITOR_PASSWORD)))
        conn.execute(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(MONITOR)))


def monitor(cluster: Cluster, dbname: str, options: str = PINNED) -> psycopg.Connection[Any]:
    """A session as the collector's (``options``: its pinned search_path)."""
    dsn = cluster.dsn(dbname=dbname, user=MONITOR, password=MONITOR_PASSWORD)
    return psycopg.connect(dsn, autocommit=True, application_name="pgfleet-test", options=options)


def qualified(query: str, conn: psycopg.Connection[Any]) -> str | None:
    """The source's SQL with its extensions' schemas, as the collector runs it;
    None if an extension it needs is not in the connection's database."""
    rows = conn.execute(
        "SELECT e.extname::pg_catalog.text, pg_catalog.quote_ident(n.nspname::pg_catalog.text)"
        " FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
    ).fetchall()
    return qualify(query, {name: schema for name, schema in rows})

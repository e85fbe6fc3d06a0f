"""A source whose extension disappears from a server is unregistered for that
server (its delta base forgotten, its history kept) and registered again when
the extension comes back: at each remote snapshot, and in local mode at once,
by an event trigger on the repository's DROP and CREATE EXTENSION.
"""

from __future__ import annotations

import psycopg

from tests.fix_clusters import NewCluster
from tests.fix_repository import RunCli, add_server, connect, scalar_int

MODULE = "pg_stat_statements"


def _absent(repo: str, srvid: int) -> list[tuple[str, str]]:
    """pg_stat_statements's absence (the extensions this PostgreSQL 18 build
    lacks, pg_stat_kcache and the others, are absent all along, rightly)."""
    with connect(repo) as conn:
        rows = conn.execute(
            "SELECT module, extension FROM pgfleet.source_absence"
            " WHERE srvid = %s AND module = %s ORDER BY 1",
            (srvid, MODULE),
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def _base(repo: str, srvid: int) -> int:
    return scalar_int(
        repo, f"SELECT count(*) FROM pgfleet.{MODULE}_last WHERE srvid = %s", (srvid,)
    )


def _kept(repo: str, srvid: int) -> int:
    """Points collected for the server: waiting and aggregated."""
    return scalar_int(
        repo,
        f"""SELECT (SELECT count(*) FROM pgfleet.{MODULE}_current WHERE srvid = %s)
                 + (SELECT count(*) FROM pgfleet.{MODULE}_history WHERE srvid = %s)""",
        (srvid, srvid),
    )


def _since(repo: str, srvid: int) -> float:
    with connect(repo) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM since) FROM pgfleet.source_absence"
            " WHERE srvid = %s AND module = %s",
            (srvid, MODULE),
        ).fetchone()
    assert row is not None
    return float(row[0])


def _snapshot(run_cli: RunCli, *args: str) -> str:
    res = run_cli("snapshot", *args)
    assert res.rc in (0, 3), res.err  # 3: stored, some source failed
    return res.out + res.err


def test_remote_extension_dropped_and_back(
    repo: str, run_cli: RunCli, new_cluster: NewCluster
) -> None:
    # A server of its own: the extension in one database and nowhere else,
    # so that dropping it there leaves the server without it.
    mon = new_cluster("presence", shared_preload_libraries="pg_stat_statements")
    app = mon.create_database("app")
    with psycopg.connect(app, autocommit=True) as conn:
        conn.execute(f"CREATE EXTENSION {MODULE}")
        conn.execute("CREATE TABLE t (id int)")
    add_server(run_cli, "presence", app)
    srvid = scalar_int(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'presence'")

    for _ in range(2):
        with psycopg.connect(app, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        _snapshot(run_cli, "presence")
    assert _absent(repo, srvid) == []
    assert _base(repo, srvid) > 0
    kept = _kept(repo, srvid)
    assert kept > 0

    with psycopg.connect(app, autocommit=True) as conn:
        conn.execute(f"DROP EXTENSION {MODULE}")
    out = _snapshot(run_cli, "presence")
    assert f"extension {MODULE} is not installed" in out
    assert _absent(repo, srvid) == [(MODULE, MODULE)]
    # Unregistered for this server: no delta base, history kept.
    assert _base(repo, srvid) == 0
    assert (
        scalar_int(
            repo,
            "SELECT count(*) FROM pgfleet.metric_state WHERE srvid = %s AND module = %s",
            (srvid, MODULE),
        )
        == 0
    )
    assert _kept(repo, srvid) == kept
    # Still absent at the next snapshot: the same row, since unchanged.
    since = _since(repo, srvid)
    _snapshot(run_cli, "presence")
    assert _since(repo, srvid) == since

    # Back: registered again.  pg_stat_statements kept counting in shared
    # memory meanwhile (DROP EXTENSION only removes its SQL objects): the
    # first snapshot after is a first one, a new delta base and no calls
    # counted, rather than every call since the drop at once.
    with psycopg.connect(app, autocommit=True) as conn:
        conn.execute(f"CREATE EXTENSION {MODULE}")
        for _ in range(50):
            conn.execute("SELECT 4242 FROM t")
    _snapshot(run_cli, "presence")
    assert _absent(repo, srvid) == []
    assert _base(repo, srvid) > 0
    assert _calls(repo, srvid) == 0
    with psycopg.connect(app, autocommit=True) as conn:
        conn.execute("SELECT 4242 FROM t")
    _snapshot(run_cli, "presence")
    assert _calls(repo, srvid, "SELECT $1 FROM t") == 1


def _calls(repo: str, srvid: int, like: str = "%") -> int:
    """Calls counted by the server's latest snapshot (of the statements like ``like``)."""
    return scalar_int(
        repo,
        f"""SELECT coalesce(sum(c.calls), 0)::bigint FROM pgfleet.{MODULE}_current c
             WHERE c.srvid = %s
               AND c.ts = (SELECT max(ts) FROM pgfleet.{MODULE}_current WHERE srvid = %s)
               AND EXISTS (SELECT FROM pgfleet.{MODULE}_once o
                            WHERE o.srvid = c.srvid AND o.queryid = c.queryid
                              AND o.query LIKE %s)""",
        (srvid, srvid, like),
    )


def test_local_event_trigger(repo: str, run_cli: RunCli) -> None:
    with connect(repo) as conn:
        if not conn.execute(
            "SELECT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'pgfleet_extension_drop')"
        ).fetchone()[0]:  # type: ignore[index]
            raise AssertionError("the repository's owner is a superuser here: triggers expected")
        assert conn.execute(
            "SELECT extension FROM pgfleet.source_extensions WHERE module = %s", (MODULE,)
        ).fetchone() == (MODULE,)
        conn.execute(f"CREATE EXTENSION IF NOT EXISTS {MODULE}")
    _snapshot(run_cli, "--local")
    assert _absent(repo, 0) == []

    # At once, without a snapshot.
    with connect(repo) as conn:
        conn.execute(f"DROP EXTENSION {MODULE}")
    assert _absent(repo, 0) == [(MODULE, MODULE)]
    assert _base(repo, 0) == 0
    with connect(repo) as conn:
        conn.execute(f"CREATE EXTENSION {MODULE}")
    assert _absent(repo, 0) == []

    # An unrelated extension changes nothing; DDL is never blocked.
    with connect(repo) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_buffercache")
        conn.execute("DROP EXTENSION pg_buffercache")
    assert _absent(repo, 0) == []

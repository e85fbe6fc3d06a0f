"""Every statement a snapshot sends is marked (snapshot.model.mark()), and
pg_stat_statements keeps the mark where MARKED finds it: what the web UI
tells pgfleet's own statements by (see repository.reads.top_queries)."""

from __future__ import annotations

import json
import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgfleet.cluster import Cluster
from pgfleet.snapshot.model import MARKED, STATEMENT_MARKER
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, connect, scalar


def test_a_snapshot_leaves_only_marked_statements(
    repo: str, run_cli: RunCli, monitored: Cluster, new_database: NewDatabase
) -> None:
    mon = new_database(monitored)
    # A role of pgfleet's own: whatever pg_stat_statements counts for it,
    # in any database of the server, pgfleet sent.
    role = f"marked_{monitored.port}"
    with connect(mon) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 's3cret' IN ROLE pg_monitor")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("SELECT count(*) FROM t WHERE id < 7")
    add_server(run_cli, "mon", mon, "--password-ref", "env:PGFLEET_PW_MON")
    assert run_cli("server", "update", "mon", "--user", role).rc == 0
    env = {"PGFLEET_PW_MON": "s3cret"}
    # The second snapshot reads the first one's statements back.
    for _ in range(2):
        res = run_cli("snapshot", "mon", "--json", env=env)
        assert res.rc == 0, res.err
        assert json.loads(res.out)["errors"] == {}

    with psycopg.connect(mon, autocommit=True) as conn:
        texts = [
            str(r[0])
            for r in conn.execute(
                "SELECT s.query FROM pg_stat_statements s"
                " JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = %s",
                (role,),
            )
        ]
    # The server's facts, extension schemas, the batches of a database's
    # sources (one value each) and the streamed COPY of pg_stat_statements.
    assert any(t.startswith(f"COPY {STATEMENT_MARKER} (SELECT ") for t in texts), texts
    assert any(t.startswith(f"SELECT {STATEMENT_MARKER} pg_catalog.string_agg(") for t in texts)
    assert any("clock_timestamp()" in t for t in texts), texts
    assert any("pg_catalog.pg_extension e" in t for t in texts), texts
    unmarked = [t[:120] for t in texts if not re.match(MARKED, t)]
    assert not unmarked

    # In the repository, the texts of ours are marked, the server's own are not.
    srvid = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'mon'")
    with connect(repo) as conn:
        stored = dict(
            conn.execute(
                "SELECT query, rolname FROM pgfleet.pg_stat_statements_once"
                " WHERE srvid = %s AND datname = %s",
                (srvid, conninfo_to_dict(mon)["dbname"]),
            ).fetchall()
        )
    ours = {q for q, r in stored.items() if r == role}
    assert ours and all(re.match(MARKED, q) for q in ours)
    theirs = [q for q in stored if q.startswith("SELECT count(*) FROM t WHERE id < $1")]
    assert theirs and stored[theirs[0]] != role and not re.match(MARKED, theirs[0])

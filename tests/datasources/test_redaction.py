"""Secrets leave a monitored server as fingerprints or ``<redacted>``, never as is.

The rules are in the sources' SQL (settings.sql, pg_stat_statements*.sql,
pg_qualstats.sql): here they meet settings and statements made up to hit
them, and some made up to be left alone.  tests/security/test_sources.py
has them on real servers' primary_conninfo, archive_command... end to end.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.cluster import Cluster
from pgfleet.datasources import builtin, load_sql
from tests.datasources.monitor import ensure_monitor_role, monitor, qualified
from tests.fix_clusters import NewDatabase

FINGERPRINT = re.compile(r"redacted sha256:[0-9a-f]{12}")

# (name, vartype, value, redacted?)
SETTINGS = [
    ("archive_command", "string", "cp %p /archive/%f", True),
    ("archive_cleanup_command", "string", "pg_archivecleanup /archive %r", True),
    ("restore_command", "string", "cp /archive/%f %p", True),
    ("recovery_end_command", "string", "/bin/true", True),
    ("ssl_passphrase_command", "string", "echo hunter2", True),
    ("primary_conninfo", "string", "host=h user=u password=hunter2", True),
    ("myext.password", "string", "hunter2", True),
    ("myext.conninfo", "string", "host=h", True),
    ("pgsodium.secret_key", "string", "k", True),
    ("anon.salt", "string", "pepper", True),
    ("vault.token", "string", "t", True),
    ("myext.api_key", "string", "k", True),
    ("pgsodium.getkey_script", "string", "/usr/bin/getkey", True),
    ("myext.dsn", "string", "dbname=x", True),
    # Names that say nothing, values that do.
    ("myext.target", "string", "host=h password=hunter2", True),
    ("myext.url", "string", "postgresql://u:hunter2@h/db", True),
    # Left alone: empty, not a string, or nothing secret in name or value.
    ("restore_command", "string", "", False),
    ("ssl_passphrase_command_supports_reload", "bool", "off", False),
    ("archive_command", "string", "(disabled)", False),
    ("archive_library", "string", "basic_archive", False),
    ("ssl_key_file", "string", "server.key", False),
    ("krb_server_keyfile", "string", "FILE:/etc/krb5.keytab", False),
    ("password_encryption", "enum", "scram-sha-256", False),
    ("search_path", "string", '"$user", public', False),
    ("myext.url", "string", "postgresql://h/db", False),
]


def _settings_rows(conn: psycopg.Connection[Any], settings: list[tuple[str, str, str]]) -> Any:
    """settings.sql over made-up rows of pg_settings."""
    values = sql.SQL(", ").join(
        sql.SQL("({}, {}, NULL, 'configuration file', false, {})").format(
            sql.Literal(n), sql.Literal(v), sql.Literal(t)
        )
        for n, t, v in settings
    )
    fake = sql.SQL("(VALUES {}) s(name, setting, unit, source, pending_restart, vartype)").format(
        values
    )
    query = load_sql("settings.sql")
    assert "pg_catalog.pg_settings s" in query
    before, after = query.split("pg_catalog.pg_settings s")
    return conn.execute(sql.SQL("{}{}{}").format(sql.SQL(before), fake, sql.SQL(after))).fetchall()


def test_settings_that_may_hold_a_secret(pg18: Cluster) -> None:
    with pg18.connect(options="-c search_path=pg_catalog,pg_temp") as conn:
        rows = _settings_rows(conn, [(n, t, v) for n, t, v, _ in SETTINGS])
        again = _settings_rows(conn, [(n, t, v + "!") for n, t, v, _ in SETTINGS])
    assert len(rows) == len(SETTINGS)
    for (name, _, value, redacted), row, other in zip(SETTINGS, rows, again, strict=True):
        assert row[1] == name
        if redacted:
            assert FINGERPRINT.fullmatch(row[2]), (name, value, row[2])
            # Another value, another fingerprint: changes still show.
            assert other[2] != row[2]
        else:
            assert row[2] == value, (name, row[2])


def test_the_same_value_has_the_same_fingerprint(pg18: Cluster) -> None:
    with pg18.connect(options="-c search_path=pg_catalog,pg_temp") as conn:
        a = _settings_rows(conn, [("restore_command", "string", "cp x y")])
        b = _settings_rows(conn, [("archive_command", "string", "cp x y")])
        c = _settings_rows(conn, [("restore_command", "string", "cp x y")])
    assert a[0][2] == b[0][2] == c[0][2]


def test_statement_texts_lose_their_passwords(
    monitored: Cluster, new_database: NewDatabase
) -> None:
    """Utility statements keep their literals in pg_stat_statements: the
    source takes out those that are passwords (and conninfos, commands)."""
    m = f"Hx{uuid.uuid4().hex[:10]}"
    dsn = new_database(monitored)
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    statements = [
        f"CREATE ROLE pgfleet_redact_a PASSWORD '{m}-1'",
        f"ALTER ROLE pgfleet_redact_a WITH ENCRYPTED PASSWORD 'it''s {m}-2' VALID UNTIL 'infinity'",
        f"ALTER ROLE pgfleet_redact_a PASSWORD E'esc\\'aped {m}-3'",
        f"ALTER ROLE pgfleet_redact_a PASSWORD $pw${m}-9$pw$ VALID UNTIL 'infinity'",
        f"CREATE SUBSCRIPTION pgfleet_redact_s CONNECTION 'host=nowhere password=''{m} 4'''"
        " PUBLICATION p WITH (connect = false)",
        f"CREATE FUNCTION pgfleet_redact_f() RETURNS text LANGUAGE sql"
        f" AS $$ SELECT 'host=h sslpassword={m}-5 user=u' $$",
        f"COMMENT ON ROLE pgfleet_redact_a IS 'see postgresql://u:{m}-6@h/db'",
        f"SET myapp.secret = '{m}-7'",
        f"SET myapp.conninfo TO 'password={m}-8'",
        # Nothing to take out: names of columns, a normalized constant.
        "CREATE TABLE pgfleet_redact_t (password text, token text, salt text)",
        "SELECT count(*) FROM pgfleet_redact_t WHERE password = 'x' AND token = 'y'",
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        for stmt in statements:
            conn.execute(stmt.encode())
        conn.execute("ALTER SUBSCRIPTION pgfleet_redact_s DISABLE")
        conn.execute("ALTER SUBSCRIPTION pgfleet_redact_s SET (slot_name = NONE)")
        conn.execute("DROP SUBSCRIPTION pgfleet_redact_s")
        conn.execute("DROP ROLE pgfleet_redact_a")

    ensure_monitor_role(monitored)
    ds = builtin()["pg_stat_statements"]
    query = ds.query_for(monitored.version_num)
    assert query is not None
    with monitor(monitored, dbname) as conn:
        resolved = qualified(query, conn)
        assert resolved is not None
        cur = conn.execute(resolved)
        assert cur.description is not None
        col = [c.name for c in cur.description].index("query")
        texts = [r[col] for r in cur.fetchall() if "pgfleet_redact" in (r[col] or "")]

    assert len(texts) >= 9, texts
    assert [t for t in texts if m in t] == []
    assert "CREATE TABLE pgfleet_redact_t (password text, token text, salt text)" in texts
    assert any(t.startswith("CREATE ROLE pgfleet_redact_a PASSWORD '<redacted>'") for t in texts)
    assert any("postgresql://u:<redacted>@h/db" in t for t in texts)


def test_constants_compared_with_secret_columns(pg15: Cluster, new_database: NewDatabase) -> None:
    """pg_qualstats keeps the constants of predicates: a column named for a
    secret gets a fingerprint of its constant, the others their constant."""
    m = f"tok{uuid.uuid4().hex[:10]}"
    dsn = new_database(pg15)
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_qualstats")
        conn.execute(
            "CREATE TABLE pgfleet_q (id integer, api_token text, colour text);"
            "INSERT INTO pgfleet_q SELECT g, 't' || g, 'c' || g FROM generate_series(1, 100) g;"
            "ANALYZE pgfleet_q"
        )
        conn.execute("SET pg_qualstats.sample_rate = 1")
        conn.execute(f"SELECT * FROM pgfleet_q WHERE api_token = '{m}'".encode())
        conn.execute(f"SELECT * FROM pgfleet_q WHERE colour = '{m}-colour'".encode())

    ensure_monitor_role(pg15)
    ds = builtin()["pg_qualstats"]
    query = ds.query_for(pg15.version_num)
    assert query is not None
    found: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while len(found) < 2:
        with monitor(pg15, dbname) as conn:
            resolved = qualified(query, conn)
            assert resolved is not None
            cur = conn.execute(resolved)
            assert cur.description is not None
            names = [c.name for c in cur.description]
            for row in cur.fetchall():
                r = dict(zip(names, row, strict=True))
                if r["qual"].startswith("public.pgfleet_q."):
                    found[r["qual"]] = r["constvalue"]
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    assert FINGERPRINT.fullmatch(found["public.pgfleet_q.api_token = ?"])
    assert found["public.pgfleet_q.colour = ?"] == f"'{m}-colour'::text"

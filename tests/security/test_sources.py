"""What the built-in sources send, and what runs when they and the repository's
functions do, on servers and repositories whose users mean harm.

Secrets: settings holding a command or a conninfo (primary_conninfo and its
password, archive_command, restore_command...) and passwords in statement
texts leave the monitored server as fingerprints or ``<redacted>`` only; a
fingerprint changes when the value does.

Trojans: a role that may create objects in a schema on the path (public with
``GRANT CREATE ON SCHEMA public TO PUBLIC``, as before PostgreSQL 15), helped
by a database owner who puts that schema first (``ALTER DATABASE ... SET
search_path = public, pg_catalog``), plants functions, operators, views,
aggregates and types named like PostgreSQL's, each of which notes in a table
the attacker reads that it ran.  None ever does: not in a real snapshot, not
when the sources' SQL runs without the collector's pinned search_path, not in
the repository's snapshot, aggregate, purge and series functions.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfleet import datasources
from pgfleet.cluster import Cluster
from pgfleet.datasources import builtin
from pgfleet.repository import schema, sources
from tests.datasources.monitor import ensure_monitor_role, monitor, qualified
from tests.fix_clusters import NewCluster, NewDatabase
from tests.fix_repository import RunCli, add_server, connect, one_row

ATTACKER = "pgfleet_trojan_author"
ATTACKER_PASSWORD = "trojan-author-secret"
PINNED = "-c search_path=pg_catalog,pg_temp"

# A trojan returning one of these types returns a forged value.
FORGED = {
    "timestamp with time zone": "'2000-01-01 00:00:00+00'",
    "bigint": "424242",
    "integer": "424242",
    "text": "'forged'",
    "name": "'forged'",
}

# Overloads that match better than pg_catalog's (an implicit cast or a
# polymorphic argument there): they win even behind pg_catalog on the path.
BETTER_FUNCTIONS = [
    ("pg_table_size", "oid", "bigint"),  # pg_catalog's takes regclass
    ("pg_relation_size", "oid", "bigint"),
    ("quote_ident", "name", "text"),  # pg_catalog's takes text
    ("format", "text, text, integer", "text"),  # pg_catalog's is VARIADIC "any"
    ("format", "text, text", "text"),
    ("format", "text, text, text", "text"),
    ("pg_advisory_xact_lock", "integer", "void"),  # pg_catalog's takes bigint
    ("pg_try_advisory_xact_lock", "integer", "boolean"),
]
# (operator, left, right, result)
BETTER_OPERATORS = [
    ("||", "text", "integer", "text"),  # pg_catalog's: text || anynonarray
    ("||", "integer", "text", "text"),
    ("||", "oid", "text", "text"),
    ("||", "text", "smallint", "text"),
    ("*", "bigint", "numeric", "numeric"),  # pg_catalog's: numeric * numeric, after a cast
    ("%", "bigint", "integer", "bigint"),  # pg_catalog's: bigint % bigint, after a cast
]
# Operators of exactly pg_catalog's types: chosen only when their schema comes
# first on the path.
EXACT_OPERATORS = [
    ("=", "oid", "oid", "boolean"),
    ("=", "integer", "integer", "boolean"),
    ("<>", "integer", "integer", "boolean"),
    ("-", "pg_lsn", "pg_lsn", "numeric"),
    ("-", "timestamp with time zone", "timestamp with time zone", "interval"),
    (">=", "timestamp with time zone", "timestamp with time zone", "boolean"),
    ("<=", "timestamp with time zone", "timestamp with time zone", "boolean"),
    ("~*", "text", "text", "boolean"),
]

LOOT = """
CREATE TABLE public.loot (what text, who text DEFAULT current_user);
GRANT INSERT, SELECT ON public.loot TO PUBLIC;
CREATE FUNCTION public.fired(_what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.loot (what) VALUES (_what);
    RETURN true;
END $$;
"""


def _source_sql() -> str:
    return "\n".join(
        datasources.load_sql(f.name)
        for f in resources.files(datasources).joinpath("sql").iterdir()
        if f.name.endswith(".sql")
    )


def _catalog_names(conn: psycopg.Connection[Any], text: str) -> tuple[set[str], set[str]]:
    """The pg_catalog functions and relations ``text`` names (with or without a schema)."""
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b", text))
    functions = {
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT proname::text FROM pg_catalog.pg_proc"
            " WHERE pronamespace = 'pg_catalog'::regnamespace AND proname = ANY (%s)",
            (list(words),),
        )
    }
    relations = {
        r[0]
        for r in conn.execute(
            "SELECT relname::text FROM pg_catalog.pg_class"
            " WHERE relnamespace = 'pg_catalog'::regnamespace AND relkind IN ('r', 'v')"
            " AND relname = ANY (%s)",
            (list(words),),
        )
    }
    return functions, relations


def plant(
    conn: psycopg.Connection[Any],
    schema: str,
    functions: Iterable[str],
    relations: Iterable[str],
    *,
    exact_operators: bool,
    extra: str = "",
) -> list[str]:
    """Trojans in ``schema``: an overload of every signature of each pg_catalog
    function named (those PL/pgSQL can take), one of each of BETTER_FUNCTIONS,
    a view over each relation, count(*) and sum(bigint), the operators, and
    domains named text and timestamptz.  Each calls public.fired() first.
    ``conn`` is the attacker's, with the search_path pinned; ``extra`` is more
    SQL to run before the domains.  Return what was planted."""
    s = sql.Identifier(schema)
    planted: list[str] = []

    def attempt(what: str, stmt: sql.SQL | sql.Composed) -> None:
        try:
            with conn.transaction():
                conn.execute(stmt)
        except psycopg.Error:
            return  # a signature PL/pgSQL cannot have ("any", internal...)
        planted.append(what)

    def trojan(name: str, args: str, result: str, body_result: sql.Composable) -> None:
        argn = len([a for a in args.split(",") if a.strip()])
        forged = FORGED.get(result)
        returned = sql.SQL(forged) if forged else body_result
        ret = sql.SQL("RETURN {};").format(returned) if result != "void" else sql.SQL("RETURN;")
        attempt(
            f"{name}({args})",
            sql.SQL(
                "CREATE FUNCTION {s}.{n}({args}) RETURNS {res} LANGUAGE plpgsql AS {body}"
            ).format(
                s=s,
                n=sql.Identifier(name),
                args=sql.SQL(args),
                res=sql.SQL(result),
                body=sql.Literal(
                    sql.SQL("BEGIN PERFORM public.fired({w}); {ret} END")
                    .format(w=sql.Literal(f"{schema}.{name}({args})"), ret=ret)
                    .as_string(conn)
                    .replace("$ARGS$", ", ".join(f"${i + 1}" for i in range(argn)))
                ),
            ),
        )

    for name in sorted(functions):
        overloads = conn.execute(
            """SELECT pg_catalog.pg_get_function_identity_arguments(p.oid),
                      pg_catalog.pg_get_function_result(p.oid)
                 FROM pg_catalog.pg_proc p
                WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = %s
                  AND p.prokind = 'f' AND NOT p.proretset
                  AND p.prorettype <> 'pg_catalog.record'::regtype""",
            (name,),
        ).fetchall()
        for args, result in overloads:
            call = sql.SQL("pg_catalog.{}($ARGS$)").format(sql.Identifier(name))
            trojan(name, args, result, call)
    for name, args, result in BETTER_FUNCTIONS:
        call = sql.SQL("pg_catalog.{}($ARGS$)").format(sql.Identifier(name))
        trojan(name, args, result, call)

    for rel in sorted(relations):
        attempt(
            f"view {rel}",
            sql.SQL(
                "CREATE VIEW {s}.{r} AS SELECT * FROM pg_catalog.{r} WHERE public.fired({w})"
            ).format(s=s, r=sql.Identifier(rel), w=sql.Literal(f"{schema}.{rel}")),
        )

    attempt(
        "count(*)",
        sql.SQL(
            """CREATE FUNCTION {s}.trojan_count(bigint) RETURNS bigint LANGUAGE plpgsql AS $$
               BEGIN PERFORM public.fired('count(*)'); RETURN $1 OPERATOR(pg_catalog.+) 1; END $$;
               CREATE AGGREGATE {s}.count(*) (SFUNC = {s}.trojan_count, STYPE = bigint,
                                               INITCOND = '0')"""
        ).format(s=s),
    )
    attempt(
        "sum(bigint)",
        sql.SQL(
            """CREATE FUNCTION {s}.trojan_sum(numeric, bigint) RETURNS numeric LANGUAGE plpgsql AS $$
               BEGIN PERFORM public.fired('sum(bigint)');
                     RETURN pg_catalog.coalesce($1, 0) OPERATOR(pg_catalog.+) $2; END $$;
               CREATE AGGREGATE {s}.sum(bigint) (SFUNC = {s}.trojan_sum, STYPE = numeric)"""
        ).format(s=s),
    )

    operators = BETTER_OPERATORS + (EXACT_OPERATORS if exact_operators else [])
    for i, (op, left, right, result) in enumerate(operators):
        fn = sql.Identifier(f"trojan_op_{i}")
        attempt(
            f"operator {op}({left}, {right})",
            sql.SQL(
                """CREATE FUNCTION {s}.{fn}({l}, {r}) RETURNS {res} LANGUAGE plpgsql AS {body};
                   CREATE OPERATOR {s}.{op} (LEFTARG = {l}, RIGHTARG = {r}, FUNCTION = {s}.{fn})"""
            ).format(
                s=s,
                fn=fn,
                l=sql.SQL(left),
                r=sql.SQL(right),
                res=sql.SQL(result),
                op=sql.SQL(op),
                body=sql.Literal(
                    f"BEGIN PERFORM public.fired('{schema}.{op}({left}, {right})');"
                    f" RETURN $1 OPERATOR(pg_catalog.{op}) $2; END"
                ),
            ),
        )
    if extra:
        conn.execute(extra)
    for typ in ("text", "timestamptz"):
        attempt(
            f"type {typ}",
            sql.SQL(
                "CREATE DOMAIN {s}.{t} AS pg_catalog.{t} CHECK (public.fired({w}) IS NOT NULL)"
            ).format(s=s, t=sql.Identifier(typ), w=sql.Literal(f"{schema}.{typ}")),
        )
    return planted


def _attacker_role(cluster: Cluster) -> None:
    with cluster.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ATTACKER,)).fetchone():
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ATTACKER), sql.Literal(ATTACKER_PASSWORD)
                )
            )


def _attacker(cluster: Cluster, dbname: str) -> psycopg.Connection[Any]:
    dsn = cluster.dsn(dbname=dbname, user=ATTACKER, password=ATTACKER_PASSWORD)
    return psycopg.connect(dsn, autocommit=True, options=PINNED)


def _loot(cluster: Cluster, dbname: str) -> list[str]:
    """What ran of the attacker's, once each."""
    with cluster.connect(dbname, options=PINNED) as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT what FROM public.loot ORDER BY what")]


def _clear_loot(cluster: Cluster, dbname: str) -> None:
    with cluster.connect(dbname, options=PINNED) as conn:
        conn.execute("TRUNCATE public.loot")


def _dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def _hostile_server_database(cluster: Cluster, new_database: NewDatabase) -> str:
    """A database where the attacker planted trojans in public (all of them) and
    in decoy (all but the exact-typed operators), and whose owner put public
    first on its search_path.  Return its name."""
    dbname = _dbname(new_database(cluster))
    _attacker_role(cluster)
    ensure_monitor_role(cluster)
    with cluster.connect(dbname, options=PINNED) as conn:
        conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(dbname), sql.Identifier(ATTACKER)))  # fmt: skip
        functions, relations = _catalog_names(conn, _source_sql())
    with _attacker(cluster, dbname) as conn:
        conn.execute(LOOT)
        conn.execute("CREATE SCHEMA decoy")
        conn.execute("GRANT USAGE ON SCHEMA decoy TO PUBLIC")
        planted = plant(conn, "public", functions, relations, exact_operators=True)
        plant(conn, "decoy", functions, relations, exact_operators=False)
    # What a source could call by mistake is there to be called.
    for must in ("now()", "pg_table_size(oid)", "view pg_settings", "count(*)", "type text"):
        assert must in planted, planted
    with cluster.connect(options=PINNED) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET search_path = public, pg_catalog").format(
                sql.Identifier(dbname)
            )
        )
    return dbname


def _armed(cluster: Cluster, dbname: str, options: str, trap: str) -> None:
    """The trap works: ``trap``, run unqualified in such a session, fires a trojan."""
    _clear_loot(cluster, dbname)
    with monitor(cluster, dbname, options) as conn:
        conn.execute(trap).fetchall()
    assert _loot(cluster, dbname), f"{trap!r} fired nothing: the test proves nothing"
    _clear_loot(cluster, dbname)


@pytest.fixture(params=["pg15", "pg18"])
def hostile(request: pytest.FixtureRequest, new_database: NewDatabase) -> tuple[Cluster, str]:
    cluster: Cluster = request.getfixturevalue(request.param)
    return cluster, _hostile_server_database(cluster, new_database)


# -- Trojans on the monitored server


def test_no_trojan_runs_in_a_snapshot(
    hostile: tuple[Cluster, str], repo: str, run_cli: RunCli
) -> None:
    """A real snapshot, as a superuser, of a database whose path puts the
    attacker's schema first: the collector's pinned path and the qualified
    SQL leave every trojan alone, and no statistic is forged."""
    cluster, dbname = hostile
    # The database's own path: its public first.
    _armed(cluster, dbname, "", "SELECT now()")
    add_server(run_cli, "hostile", cluster.dsn(dbname=dbname))

    res = run_cli("snapshot", "hostile", "--json")
    assert res.rc == 0, res.err
    result = json.loads(res.out)
    assert result["errors"] == {}
    loot = _loot(cluster, dbname)
    assert loot == [], f"the attacker's code ran: {loot}"

    with connect(repo) as conn:
        srvid = one_row(conn, "SELECT srvid FROM pgfleet.servers WHERE alias = 'hostile'")[0]
        forged = conn.execute(
            """SELECT 'ts' FROM pgfleet.pg_stat_database_current
                WHERE srvid = %(s)s AND ts < '2001-01-01'
               UNION ALL
               SELECT 'size' FROM pgfleet.pg_stat_user_tables_last
                WHERE srvid = %(s)s AND size = 424242
               UNION ALL
               SELECT 'datname' FROM pgfleet.pg_stat_database_current
                WHERE srvid = %(s)s AND datname = 'forged'""",
            {"s": srvid},
        ).fetchall()
        assert forged == []
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_database_current"
                " WHERE srvid = %s AND datname = %s",
                (srvid, dbname),
            )[0]
            == 1
        )


@pytest.mark.parametrize(
    ("path", "trap"),
    [
        # The attacker's schema first: any name left unqualified would do.
        ("decoy,pg_catalog", "SELECT now()"),
        # pg_catalog first (implicitly): only better matches can win.
        ("public", "SELECT pg_table_size(c.oid) FROM pg_class c LIMIT 1"),
    ],
)
def test_source_sql_runs_no_trojan_without_the_pin(
    hostile: tuple[Cluster, str], path: str, trap: str
) -> None:
    """Every source's SQL, as the pg_monitor role, in a session that does not
    pin its search_path: functions, views, aggregates and types are named
    with their schema, operators have exactly pg_catalog's operand types."""
    cluster, dbname = hostile
    options = f"-c search_path={path}"
    _armed(cluster, dbname, options, trap)
    ran = []
    with monitor(cluster, dbname, options) as conn:
        for ds in builtin().values():
            query = ds.query_for(cluster.version_num)
            if query is None:
                continue
            query = qualified(query, conn)
            if query is None:
                continue  # its extension is not in this database
            conn.execute(query).fetchall()
            ran.append(ds.module)
    assert "pg_stat_statements" in ran and "settings" in ran
    loot = _loot(cluster, dbname)
    assert loot == [], f"the attacker's code ran: {loot}"


# -- Trojans in the repository


def _repository_trojans(repo: str) -> None:
    """The attacker, a pgfleet reader with CREATE on the repository's public,
    plants trojans for every pg_catalog function and relation the
    repository's functions name, unnest overloads of pgfleet's point types,
    and then the database gets public first on its path."""
    cluster_dsn = conninfo_to_dict(repo)
    dbname = str(cluster_dsn["dbname"])
    with psycopg.connect(repo, autocommit=True, options=PINNED) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ATTACKER,)).fetchone():
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ATTACKER), sql.Literal(ATTACKER_PASSWORD)
                )
            )
        conn.execute(sql.SQL("GRANT pgfleet_read TO {}").format(sql.Identifier(ATTACKER)))
        conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        defs = "\n".join(
            r[0]
            for r in conn.execute(
                "SELECT pg_catalog.pg_get_functiondef(p.oid) FROM pg_catalog.pg_proc p"
                " WHERE p.pronamespace = 'pgfleet'::regnamespace AND p.prokind = 'f'"
            )
        )
        functions, relations = _catalog_names(conn, defs)
        points = [
            r[0]
            for r in conn.execute(
                "SELECT t.oid::regtype::text FROM pg_catalog.pg_type t"
                " WHERE t.typnamespace = 'pgfleet'::regnamespace AND t.typtype = 'c'"
                " AND t.typname ~ '_point$'"
            )
        ]
    unnests = "\n".join(
        f"""CREATE FUNCTION public.unnest({t}[]) RETURNS SETOF {t} LANGUAGE plpgsql AS $$
            BEGIN PERFORM public.fired('unnest({t}[])');
                  RETURN QUERY SELECT * FROM pg_catalog.unnest($1); END $$;"""
        for t in [*points, "timestamptz"]
    )
    attacker = make_conninfo(repo, user=ATTACKER, password=ATTACKER_PASSWORD)
    with psycopg.connect(attacker, autocommit=True, options=PINNED) as conn:
        conn.execute(LOOT)
        plant(conn, "public", functions, relations, exact_operators=True, extra=unnests)
    with psycopg.connect(repo, autocommit=True, options=PINNED) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET search_path = public, pg_catalog").format(
                sql.Identifier(dbname)
            )
        )


@pytest.fixture
def hostile_repo(repo: str) -> Iterator[str]:
    _repository_trojans(repo)
    yield repo


def _repo_loot(repo: str) -> list[str]:
    with psycopg.connect(repo, autocommit=True, options=PINNED) as conn:
        return [r[0] for r in conn.execute("SELECT DISTINCT what FROM public.loot ORDER BY what")]


def test_repository_functions_call_no_trojan(hostile_repo: str) -> None:
    """Installing the sources, local snapshots through aggregation and purge,
    staged rows of another server, the series and sums readers: all in
    sessions whose path is the database's, public first."""
    repo = hostile_repo
    with psycopg.connect(repo, autocommit=True) as conn:
        conn.execute("SELECT now()")
    assert _repo_loot(repo) == ["public.now()"], "the trap is not armed"
    with psycopg.connect(repo, autocommit=True, options=PINNED) as conn:
        conn.execute("TRUNCATE public.loot")
        conn.execute("UPDATE pgfleet.servers SET coalesce = 1 WHERE srvid = 0")
        srvid = one_row(
            conn, "INSERT INTO pgfleet.servers (alias, host) VALUES ('x', 'h') RETURNING srvid"
        )[0]

    with psycopg.connect(repo) as conn:  # the database's path; one transaction
        sources.install_builtin(conn)
        conn.commit()
        conn.autocommit = True
        # The sources local mode can run here (as the CLI picks them).
        version, extensions = one_row(
            conn,
            "SELECT pg_catalog.current_setting('server_version_num')::integer,"
            " ARRAY(SELECT extname::pg_catalog.text FROM pg_catalog.pg_extension)",
        )
        modules = [
            ds.module
            for ds in builtin().values()
            if ds.query_for(version) and (ds.extension is None or ds.extension in extensions)
        ]
        # Every snapshot aggregates (coalesce 1); the 10th also purges.
        for _ in range(10):
            failures = one_row(conn, "SELECT pgfleet.take_snapshot(0, %s)", (modules,))[0]
            assert failures == 0, conn.execute("SELECT * FROM pgfleet.snapshot_errors").fetchall()
        # Another server's rows, staged as the collector stages them.
        with conn.transaction():
            conn.execute(
                "INSERT INTO pgfleet.pg_stat_database_src_tmp"
                " SELECT %s, s.* FROM pgfleet.pg_stat_database_src(0) s",
                (srvid,),
            )
            assert one_row(conn, "SELECT pgfleet.take_snapshot(%s)", (srvid,))[0] == 0
            conn.execute("TRUNCATE pgfleet.pg_stat_database_src_tmp")
        registered = [r[0] for r in conn.execute("SELECT module FROM pgfleet.metric_sources")]
        start, end = datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(hours=1)
        read = 0
        for module in registered:
            for reader in ("series", "sums"):
                fn = sql.Identifier("pgfleet", f"{module}_{reader}")
                found = conn.execute(
                    "SELECT pg_catalog.to_regproc(%s) IS NOT NULL", (f"pgfleet.{module}_{reader}",)
                ).fetchone()
                if not (found and found[0]):
                    continue
                count = conn.execute(
                    sql.SQL("SELECT pg_catalog.count(*) FROM {}(%s, %s, %s)").format(fn),
                    (0, start, end),
                ).fetchone()
                assert count is not None
                read += count[0]
        assert read > 0
        conn.execute("SELECT pgfleet.metric_rollup_rebuild('pg_stat_statements')")
        errors = conn.execute("SELECT source, message FROM pgfleet.snapshot_errors").fetchall()
    assert errors == []
    loot = _repo_loot(repo)
    assert loot == [], f"the attacker's code ran: {loot}"


def test_every_repository_function_is_pinned(repo: str) -> None:
    """Every function in schema pgfleet sets search_path = pg_catalog, pg_temp,
    but the inlined series and sums readers, whose bodies name everything
    with its schema (a migration adding a function must do either)."""
    with connect(repo) as conn:
        rows = conn.execute(
            """SELECT p.proname::text, p.proconfig, p.prosrc
                 FROM pg_catalog.pg_proc p
                WHERE p.pronamespace = 'pgfleet'::regnamespace AND p.prokind IN ('f', 'p')"""
        ).fetchall()
        readers = {
            f"{m}_{r}"
            for (m,) in conn.execute("SELECT module FROM pgfleet.metric_sources")
            for r in ("series", "sums")
        }
    assert len(rows) > 100
    unpinned = []
    for name, config, body in rows:
        if name in readers:
            assert config is None, f"{name} must stay inlinable"
            code = re.sub(r"OPERATOR\(pg_catalog\.[^)]*\)", " ", body)
            # String literals hold no calls nor operators ('%2C' is data).
            code = re.sub(r"'(?:[^']|'')*'", "''", code)
            # Calls not schema-qualified (alias column lists aside), operators
            # not written OPERATOR(pg_catalog.x).
            calls = set(re.findall(r"(?<![.\w])(?<!AS )([A-Za-z_]\w*)\s*\(", code))
            # Keywords, not functions: nobody can define LATERAL, NULLIF, COALESCE...
            keywords = {"SELECT", "FROM", "AND", "OR", "LATERAL", "NULLIF", "WHEN", "COALESCE"}
            assert calls <= keywords | {"FILTER"}, (name, calls)
            assert not re.findall(r"[=<>*+/%|~!-]+", code), (name, code)
        elif "search_path=pg_catalog, pg_temp" not in (config or []):
            unpinned.append(name)
    assert unpinned == [], f"search_path not pinned: {sorted(unpinned)}"


# -- Secrets


def _repository_mentions(repo: str, needle: str) -> list[str]:
    """The tables of the repository (pgfleet and public) with a row mentioning ``needle``."""
    found = []
    with connect(repo) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c"
                " WHERE c.relnamespace IN ('pgfleet'::regnamespace, 'public'::regnamespace)"
                " AND c.relkind = 'r'"
            )
        ]
        for t in tables:
            q = sql.SQL("SELECT count(*) FROM {} x WHERE x::text LIKE %s").format(sql.SQL(t))
            row = conn.execute(q, (f"%{needle}%",)).fetchone()
            if row and row[0]:
                found.append(t)
    return found


def _run_sources(cluster: Cluster, dbname: str = "postgres") -> dict[str, list[tuple[Any, ...]]]:
    """Every source applicable to ``cluster``, run as the collector runs it."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    ensure_monitor_role(cluster.primary or cluster)
    if cluster.primary is not None:
        cluster.wait_replay()
    with monitor(cluster, dbname) as conn:
        for ds in builtin().values():
            query = ds.query_for(cluster.version_num)
            if query is None:
                continue
            query = qualified(query, conn)
            if query is not None:
                out[ds.module] = conn.execute(query).fetchall()
    return out


def _setting(cluster: Cluster, name: str) -> Any:
    (row,) = [r for r in _run_sources(cluster)["settings"] if r[1] == name]
    return row[2]


def _reload_until(cluster: Cluster, name: str, value: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    with cluster.connect(options=PINNED) as conn:
        conn.execute("SELECT pg_reload_conf()")
        while conn.execute("SELECT current_setting(%s)", (name,)).fetchone() != (value,):
            assert time.monotonic() < deadline, f"{name} is not {value!r} after a reload"
            time.sleep(0.05)


def _streaming(standby: Cluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with standby.connect(options=PINNED) as conn:
        while conn.execute("SELECT status FROM pg_stat_wal_receiver").fetchone() != ("streaming",):
            assert time.monotonic() < deadline, "the standby does not stream again"
            time.sleep(0.1)


@pytest.fixture
def standby_password(pg15_standby: Cluster) -> Iterator[tuple[Cluster, str]]:
    """The standby's primary_conninfo, with a password (trust ignores it); put back after."""
    with pg15_standby.connect(options=PINNED) as conn:
        row = one_row(conn, "SHOW primary_conninfo")
    original = str(row[0])
    yield pg15_standby, original
    with pg15_standby.connect(options=PINNED) as conn:
        conn.execute(
            sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(original))
        )
    _reload_until(pg15_standby, "primary_conninfo", original)
    _streaming(pg15_standby)


def test_standby_primary_conninfo_leaves_as_a_fingerprint(
    standby_password: tuple[Cluster, str], repo: str, run_cli: RunCli
) -> None:
    standby, original = standby_password
    fingerprints = []
    for secret in (f"pw-{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}"):
        conninfo = f"{original} password={secret}"
        with standby.connect(options=PINNED) as conn:
            conn.execute(
                sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(conninfo))
            )
        _reload_until(standby, "primary_conninfo", conninfo)

        rows = _run_sources(standby)
        assert secret not in repr(rows)
        value = _setting(standby, "primary_conninfo")
        assert re.fullmatch(r"redacted sha256:[0-9a-f]{12}", value), value
        fingerprints.append(value)

        if len(fingerprints) == 1:
            add_server(run_cli, "standby", standby.dsn())
        res = run_cli("snapshot", "standby", "--json")
        assert res.rc == 0, res.err
        assert secret not in res.out + res.err
        assert _repository_mentions(repo, secret) == []
        assert _repository_mentions(repo, value) != []
    # A new password is a new value: a change that shows.
    assert fingerprints[0] != fingerprints[1]


def test_commands_and_secrets_leave_as_fingerprints(
    new_cluster: NewCluster, repo: str, run_cli: RunCli
) -> None:
    """archive_command, restore_command and statement texts that carry a
    password, on a server with all of them."""
    marker = f"s3cr3t{uuid.uuid4().hex[:8]}"
    cluster = new_cluster(
        "secrets",
        shared_preload_libraries=["pg_stat_statements"],
        settings={
            "archive_mode": "on",
            "archive_command": f"test ! -f /nowhere/%f # token={marker}-archive",
            "restore_command": f"cp /nowhere/%f %p # {marker}-restore",
        },
    )
    with cluster.connect(options=PINNED) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements SCHEMA public")
        conn.execute(sql.SQL("CREATE ROLE pgfleet_pw_role PASSWORD {}").format(
            sql.Literal(f"{marker}-role")))  # fmt: skip
        conn.execute(
            sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(
                sql.Literal(f"host=nowhere user=u password={marker}-conninfo")
            )
        )
        conn.execute("ALTER SYSTEM RESET primary_conninfo")
        conn.execute(
            sql.SQL("CREATE SUBSCRIPTION pgfleet_sub CONNECTION {} PUBLICATION p"
                    " WITH (connect = false)").format(
                sql.Literal(f"host=nowhere password={marker}-sub")))  # fmt: skip

    rows = _run_sources(cluster)
    leaks = [(m, r) for m, rs in rows.items() for r in rs if marker in repr(r)]
    assert leaks == []
    texts = [r for r in rows["pg_stat_statements"] if "pgfleet_pw_" in str(r)]
    assert texts, "the CREATE ROLE statement is not in pg_stat_statements"
    settings = {r[1]: r[2] for r in rows["settings"]}
    for name in ("archive_command", "restore_command"):
        assert re.fullmatch(r"redacted sha256:[0-9a-f]{12}", settings[name]), (name, settings[name])
    # Empty stays empty; what holds no secret is as it is.
    assert settings["recovery_end_command"] == ""
    assert settings["archive_mode"] == "on"

    add_server(run_cli, "secrets", cluster.dsn())
    res = run_cli("snapshot", "secrets", "--json")
    assert res.rc == 0, res.err
    assert json.loads(res.out)["errors"] == {}
    assert _repository_mentions(repo, marker) == []

    # The command changes: so does its fingerprint, stored as a change.
    before = settings["archive_command"]
    with cluster.connect(options=PINNED) as conn:
        conn.execute("ALTER SYSTEM SET archive_command = 'test ! -f /elsewhere/%f'")
    _reload_until(cluster, "archive_command", "test ! -f /elsewhere/%f")
    after = _setting(cluster, "archive_command")
    assert after != before and after.startswith("redacted sha256:")
    assert run_cli("snapshot", "secrets").rc == 0
    with connect(repo) as conn:
        stored = [
            r[0]
            for r in conn.execute(
                "SELECT c.setting FROM pgfleet.settings_current c"
                " JOIN pgfleet.servers s USING (srvid)"
                " WHERE s.alias = 'secrets' AND c.name = 'archive_command' ORDER BY c.ts"
            )
        ]
    assert stored == [before, after]


def test_upgrade_qualifies_names_registered_without_a_schema(
    pg18: Cluster, new_database: NewDatabase
) -> None:
    """A repository from before 0009 whose user source was registered as
    'my_snapshot': with the path pinned that name would resolve no more, so
    0009 writes it with the schema it resolved to, and the source still runs."""
    dsn = new_database(pg18)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("CREATE SCHEMA pgfleet")
            conn.execute(
                "CREATE TABLE pgfleet.schema_migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for mig in schema.migrations():
                if mig.version >= 9:
                    break
                conn.execute(mig.sql.encode())
                conn.execute(
                    "INSERT INTO pgfleet.schema_migrations (version, name) VALUES (%s, %s)",
                    (mig.version, mig.name),
                )
        conn.execute(
            """CREATE TABLE public.mine (srvid integer, ts timestamptz);
               CREATE FUNCTION public.mine_snapshot(_srvid integer) RETURNS void
               LANGUAGE sql AS $$ INSERT INTO public.mine VALUES (_srvid, now()) $$;
               INSERT INTO pgfleet.functions (module, operation, function_name, query_source)
               VALUES ('mine', 'snapshot', 'mine_snapshot', 'mine_src')"""
        )
        schema.upgrade(conn)
        assert conn.execute(
            "SELECT function_name, query_source FROM pgfleet.functions WHERE module = 'mine'"
        ).fetchall() == [("public.mine_snapshot", "mine_src")]  # no mine_src anywhere
        assert one_row(conn, "SELECT pgfleet.take_snapshot(0, '{mine}')")[0] == 0
        assert one_row(conn, "SELECT count(*) FROM public.mine")[0] == 1

"""The command channel under a flood: garbage is capped and counted, commands get through.

Anyone who can connect to the repository may NOTIFY the collectors' channel,
as fast as they like.  The collector caps what waits per sending backend,
counts what it drops, and reads the request rows (which only pgfleet_admin
members can insert) before answering garbage: a flood never delays an
authorised command much, and never loses one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from pgfleet.cluster import Cluster
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, add_server, connect, new_repository, scalar

GARBAGE = 10_000
BURST = 2_000  # in one transaction: they reach the collector at once
SENDERS = 4
LEGIT = 8


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    """A fresh repository, on this module's own cluster (see fix_daemon)."""
    return new_repository(repo_cluster, new_database)


@pytest.fixture
def roles(repo: str, repo_cluster: Cluster) -> Iterator[tuple[str, str]]:
    """(admin dsn, nobody dsn): a pgfleet_admin member, and a role that may only connect."""
    for role in ("flood_admin", "flood_nobody"):
        repo_cluster.execute(f"DROP ROLE IF EXISTS {role}")
        repo_cluster.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    repo_cluster.execute("GRANT pgfleet_admin TO flood_admin")
    yield (
        psycopg.conninfo.make_conninfo(repo, user="flood_admin", password="pw"),
        psycopg.conninfo.make_conninfo(repo, user="flood_nobody", password="pw"),
    )
    for role in ("flood_admin", "flood_nobody"):
        repo_cluster.execute(f"DROP ROLE {role}")


def garbage(sender: int, i: int) -> str:
    """Distinct payloads (NOTIFY folds duplicates within a transaction), of every kind."""
    return [
        f"RELOAD t_flood_{sender}_{i}",  # well formed, no request: KO
        f"x{sender}_{i}",  # nowhere to answer
        f"FORCE_SNAPSHOT t_flood {sender}{i}",  # well formed, no request: KO
        f"BOGUS{sender}_{i} t_flood",  # unknown: KO
        f"RELOAD pgfleet_collector {i}",  # answers on the command channel: ignored
    ][i % 5]


def flood(dsn: str, sender: int, count: int, started: threading.Event, until: list[float]) -> None:
    """Send ``count`` garbage notifications, the first BURST at once for sender 0."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        sent = 0
        batch = BURST if sender == 0 else 25
        while sent < count:
            n = min(batch, count - sent)
            with conn.transaction():
                conn.execute(
                    "SELECT pg_notify('pgfleet_collector', p) FROM unnest(%s::text[]) p",
                    ([garbage(sender, sent + k) for k in range(n)],),
                )
            sent += n
            started.set()
            batch = 25
            time.sleep(0.05)  # 2,000 a second from 4 senders: some 5 s
    until.append(time.monotonic())


def test_flood_does_not_starve_commands(
    repo: str,
    run_cli: RunCli,
    daemon: DaemonFactory,
    mon: Cluster,
    roles: tuple[str, str],
) -> None:
    admin, nobody = roles
    add_server(run_cli, "c1", mon.dsn(), "--frequency", "60")
    d = daemon(repo)
    wait_until(
        lambda: scalar(repo, "SELECT count(*) FROM pgfleet.collector_leases") == 1,
        15,
        "the lease",
    )

    started, ended = threading.Event(), list[float]()
    per_sender = GARBAGE // SENDERS
    senders = [
        threading.Thread(target=flood, args=(nobody, s, per_sender, started, ended))
        for s in range(SENDERS)
    ]
    for sender in senders:
        sender.start()
    answered: list[int] = []
    took: list[float] = []
    sent_at: list[float] = []
    try:
        assert started.wait(10)
        for i in range(LEGIT):
            t0 = time.monotonic()
            sent_at.append(t0)
            if i % 2:
                res = run_cli("--repository", admin, "snapshot", "--now", "c1", "--timeout", "10")
                ok = res.rc == 0 and "'c1'" in res.out
            else:
                res = run_cli("--repository", admin, "reload", "--timeout", "10")
                ok = res.rc == 0 and res.out.startswith(f"collector {d.name}: configuration")
            assert ok, (i, res)
            answered.append(i)
            took.append(time.monotonic() - t0)
            time.sleep(0.2)
    finally:
        for sender in senders:
            sender.join(60)
    assert answered == list(range(LEGIT))
    assert max(ended) > sent_at[-1], "the commands were not all sent during the flood"
    print(f"answered in {', '.join(f'{s:.2f}' for s in took)} s")

    assert d.alive()
    assert d.stop() == 0
    totals = d.find("command channel totals")
    assert totals, d.text()[-2000:]
    t = totals[-1]
    # Every notification received, and each accounted for: a command, an
    # answer, or a drop -- none lost without a count.
    assert t["received"] == GARBAGE + LEGIT
    assert t["dropped"] >= BURST - 2 * 32, t  # the burst, past its sender's cap
    assert t["reload"] == LEGIT // 2 and t["force_snapshot"] == LEGIT // 2
    accounted = sum(t.get(k, 0) for k in ("dropped", "malformed", "refused", "ignored"))
    assert accounted + LEGIT == t["received"], t
    # The flood is said, not logged line by line.
    dropped = d.find("command notifications dropped: too many waiting")
    assert dropped and sum(e["dropped"] for e in dropped) == t["dropped"]
    assert len(d.find("malformed command")) + len(d.find("command refused")) < 200
    with connect(repo) as conn:
        # No answer was lost either: nothing the flood did reached the requests.
        assert conn.execute("SELECT count(*) FROM pgfleet.collector_requests").fetchall() == [
            (LEGIT,)
        ]

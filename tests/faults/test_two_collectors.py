"""Two collectors and a repository outage: neither loses the other's.

Two real ``pgfleet collector`` processes share four servers; the shared
repository is stopped for more than five lease periods, during which both
spool, then started again.  Whichever collector is back first must not
count the other one dead and take its leases -- whose spooled snapshots
would then fail the lease fence -- and every snapshot either took is stored,
each server's in order.

Who comes back first is forced: the other one is frozen (SIGSTOP) while the
repository starts, and thawed a while after the first one's lease round,
longer than a lease period after it.  Round after round, each is first at
least once; a last round lets them race.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections import Counter
from datetime import datetime

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from pgfleet.cluster import Cluster
from pgfleet.repository import schema
from tests.faults import add_servers, spooled_files
from tests.fix_clusters import NewCluster
from tests.fix_daemon import DaemonFactory, DaemonProcess, wait_until

PERIOD = 2.0
OUTAGE = 5 * PERIOD + 1
ALIASES = ("t1", "t2", "t3", "t4")
COALESCE = 100_000  # no aggregate: pg_stat_database_current's row order stays the store order


def stored(repo: str, srvid: int) -> int:
    with psycopg.connect(repo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT snapshots FROM pgfleet.snapshot_state WHERE srvid = %s", (srvid,)
        ).fetchone()
    return int(row[0]) if row else 0


def holders(repo: str) -> dict[int, str]:
    with psycopg.connect(repo, autocommit=True) as conn:
        rows = conn.execute("SELECT srvid, owner FROM pgfleet.collector_leases").fetchall()
    return {srvid: owner for srvid, owner in rows}


def heartbeat(repo: str, name: str) -> datetime | None:
    with psycopg.connect(repo, autocommit=True) as conn:
        row = conn.execute(
            "SELECT heartbeat FROM pgfleet.collectors WHERE name = %s", (name,)
        ).fetchone()
    return None if row is None else row[0]


def now(repo: str) -> datetime:
    with psycopg.connect(repo, autocommit=True) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def lost(d: DaemonProcess) -> float:
    """Snapshots the daemon says it dropped (spool) or lost (fresh ones)."""
    with urllib.request.urlopen(d.exporter_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pgfleet_spool_dropped_total" or (
                s.name == "pgfleet_snapshots_total" and s.labels.get("outcome") == "dropped"
            ):
                total += s.value
    return total


def outcomes(d: DaemonProcess, alias: str) -> Counter[str]:
    """What the daemon's workers said of each snapshot of ``alias``."""
    out: Counter[str] = Counter()
    for e in d.events():
        msg = str(e.get("msg", ""))
        if e.get("server") == alias and msg in (
            "snapshot stored",
            "snapshot spooled",
            "snapshot dropped",
        ):
            out[msg.split()[1]] += 1
    return out


def test_repository_outage_with_two_collectors(
    new_cluster: NewCluster, daemon: DaemonFactory, mon: Cluster
) -> None:
    repo_cluster = new_cluster("shared_repo")
    repo = repo_cluster.create_database("pgfleet")
    with psycopg.connect(repo, autocommit=True) as conn:
        schema.upgrade(conn)
    srvids = add_servers(repo, mon, ALIASES, COALESCE)
    a = daemon(repo, name="a", collector={"lease_period": PERIOD})
    b = daemon(repo, name="b", collector={"lease_period": PERIOD})
    names = {a.name: a, b.name: b}
    wait_until(
        lambda: Counter(holders(repo).values()) == {a.name: 2, b.name: 2}, 30, "a and b to share"
    )
    wait_until(
        lambda: all(stored(repo, s) >= 2 for s in srvids.values()), 30, "snapshots of every server"
    )
    shared = holders(repo)
    first_back: list[str] = []
    spooled_before = {d.name: 0 for d in (a, b)}

    for late in (b, a, None):
        repo_cluster.stop()
        time.sleep(OUTAGE)
        for d in (a, b):
            n = sum(outcomes(d, x)["spooled"] for x in ALIASES)
            assert n - spooled_before[d.name] >= 2 * (OUTAGE - 2), (d.name, n)
            spooled_before[d.name] = n
        early = None if late is None else (a if late is b else b)
        if late is not None:
            late.signal(signal.SIGSTOP)
        try:
            repo_cluster.start()
            started = now(repo)
            if early is not None:
                name = early.name

                def back(since: datetime = started, who: str = name) -> bool:
                    beat = heartbeat(repo, who)
                    return beat is not None and beat > since

                wait_until(back, 20, f"{name} back first")
                # The late one stays away longer than a lease period: its
                # leases have expired, and the first one back sees them so.
                time.sleep(PERIOD + 1)
                assert holders(repo) == shared, "leases taken while their owner was away"
        finally:
            if late is not None:
                late.signal(signal.SIGCONT)

        def both_back(since: datetime = started) -> bool:
            beats = [heartbeat(repo, d.name) for d in (a, b)]
            return all(h is not None and h > since for h in beats)

        wait_until(both_back, 30, "both collectors back")
        beats = {d.name: heartbeat(repo, d.name) for d in (a, b)}
        if early is not None:
            first_back.append(early.name)
        else:
            first_back.append(min(beats, key=lambda n: beats[n] or started))
        wait_until(lambda: spooled_files(a) + spooled_files(b) == 0, 40, "both spools drained")
        assert holders(repo) == shared, "leases moved after the outage"
        for d in (a, b):
            assert lost(d) == 0, d.name
    assert set(first_back[:2]) == set(names), first_back

    # Everything either took is in the repository, or in a spool (taken
    # during the stop: one per server at most), each server's in order.
    for d in (a, b):
        assert d.stop() == 0
        assert not d.find("lease lost to another collector: snapshot dropped"), d.name
        assert not d.find("snapshot refused by the repository: dropped"), d.name
        assert not d.find("spool full: oldest snapshots dropped"), d.name
    with psycopg.connect(repo, autocommit=True) as conn:
        report = []
        for alias, srvid in srvids.items():
            said = [outcomes(d, alias) for d in (a, b)]
            assert all(s["dropped"] == 0 for s in said), (alias, said)
            spooled = sum(s["spooled"] for s in said)
            told = sum(s["stored"] for s in said) + spooled
            there = stored(repo, srvid) + spooled_files(a, srvid) + spooled_files(b, srvid)
            report.append(f"{alias}: taken {told}, spooled {spooled}, in the repository {there}")
            assert 0 <= there - told <= 2, (alias, said, there)
            assert spooled >= 3 * (OUTAGE - 2), (alias, spooled)
            ts = [
                r[0]
                for r in conn.execute(
                    """SELECT ts FROM pgfleet.pg_stat_database_current
                        WHERE srvid = %s AND datname = 'postgres' ORDER BY ctid""",
                    (srvid,),
                ).fetchall()
            ]
            assert len(ts) > 5 and ts == sorted(set(ts)), alias
    print("first back:", first_back, "\n" + "\n".join(report))

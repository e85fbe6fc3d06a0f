"""Fixtures starting real PostgreSQL clusters, once per test session.

- `pg18`: the embedded PostgreSQL 18, with pg_stat_statements.
- `pg15`: Debian's PostgreSQL 15, with the extensions pgfleet knows about;
  its tests are skipped if it isn't installed.
- `pg15_standby`: a hot standby of `pg15`.
- `pg13`, `pg14`, `pg16`, `pg17`: the PostgreSQL builds from npm that
  scripts/pgbuilds.py fetches (contrib included: pg_stat_statements is
  preloaded); skipped if not fetched, failed on CI.  `pgbuilds.prestart()`
  starts several at once.
- `monitored`: each of `pg15` and `pg18` in turn.
- `new_database`: a factory of fresh databases, one per test for isolation.
- `new_cluster`: a factory of private embedded clusters, destroyed after the
  test, for tests that must stop or crash their server.

All the data lives in one temporary directory, removed at the end.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import itertools
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from pgfleet.cluster import Cluster
from pgfleet.errors import ClusterError

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
PG15_PRELOAD = ["pg_stat_statements", "pg_qualstats", "pg_stat_kcache", "pg_wait_sampling"]
PG15_EXTENSIONS = [*PG15_PRELOAD, "hypopg"]

# The factories' types, for the tests asking for them.
NewDatabase = Callable[[Cluster], str]
"""``new_database(cluster)``: the dsn of a new, empty database on ``cluster``."""


class NewCluster(Protocol):
    """``new_cluster(name, **kwargs)``: a started private cluster (see the fixture)."""

    def __call__(self, name: str, **kwargs: Any) -> Cluster: ...


# Every cluster we start, so that none outlives the run even if a teardown
# blows up or pytest dies of an internal error.
_started: list[Cluster] = []


@atexit.register
def _kill_leftovers() -> None:
    for cluster in reversed(_started):
        with contextlib.suppress(Exception):
            cluster.kill()


@pytest.fixture(scope="session")
def clusters_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The directory holding all the clusters of the session."""
    path = tmp_path_factory.mktemp("clusters")
    if os.geteuid() == 0:
        _open_to_others(tmp_path_factory.getbasetemp(), path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _open_to_others(basetemp: Path, path: Path) -> None:
    """Let the unprivileged OS user running the servers reach `path`.

    pytest makes its temp dirs 0700, root-owned when we're root; add o+x (not
    o+r: others may pass, not list) to those it made on our way to `path`.
    """
    dirs = [path, *path.relative_to(basetemp).parents]
    dirs = [basetemp / d for d in dirs]
    if basetemp.parent.name.startswith("pytest-of-"):
        dirs.append(basetemp.parent)
    for d in dirs:
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def require_pg15(extensions: list[str]) -> None:
    """Skip the test unless Debian's PostgreSQL 15 and these extensions are installed."""
    if not (PG15_BIN / "postgres").exists():
        pytest.skip(f"PostgreSQL 15 is not installed ({PG15_BIN}): run `make venv` as root")
    libdir = PG15_BIN.parent / "lib"
    if missing := [ext for ext in extensions if not (libdir / f"{ext}.so").exists()]:
        pytest.skip(f"PostgreSQL 15 lacks {', '.join(missing)}: run `make venv` as root")


def start_pg15(
    datadir: Path, extensions: list[str], settings: dict[str, str | int] | None = None
) -> Cluster:
    """Debian's PostgreSQL 15 started in ``datadir``, the extensions pgfleet
    reads preloaded (skip the test if it or ``extensions`` are not installed)."""
    require_pg15(extensions)
    cluster = Cluster.debian(
        15,
        datadir,
        shared_preload_libraries=PG15_PRELOAD,
        # pg_qualstats samples 1/max_connections of the queries by default:
        # tests want to see theirs.
        settings={"pg_qualstats.sample_rate": 1, **(settings or {})},
        name=datadir.name,
    )
    return _start(cluster, f"Debian's PostgreSQL 15 ({datadir.name})")


def _start(cluster: Cluster, what: str) -> Cluster:
    """Init and start `cluster`, or fail its fixture with one clear message."""
    _started.append(cluster)
    try:
        if not cluster.initialized:
            cluster.init()
        cluster.start()
    except ClusterError as ex:
        error = str(ex)
    else:
        return cluster
    # Out of the except block, lest pytest print the ClusterError twice.
    pytest.fail(f"{what} is unusable: {error}\n{_log_tail(cluster)}", pytrace=False)


def _log_tail(cluster: Cluster) -> str:
    tail = cluster.log_tail(15)
    return f"--- last lines of {cluster.log_file}:\n{tail}" if tail else "(no server log)"


def _teardown(cluster: Cluster) -> None:
    try:
        cluster.destroy()
    except ClusterError:
        cluster.kill()


# The session's clusters gather a database per test, and a snapshot connects
# to every database of its server at once: room for a few hundred.
MAX_CONNECTIONS = 400


@pytest.fixture(scope="session")
def pg18(clusters_dir: Path) -> Iterator[Cluster]:
    """The embedded PostgreSQL 18, with pg_stat_statements in every new database."""
    cluster = Cluster.embedded(
        clusters_dir / "pg18",
        shared_preload_libraries=["pg_stat_statements"],
        settings={"max_connections": MAX_CONNECTIONS},
        name="pg18",
    )
    _start(cluster, "the embedded PostgreSQL 18")
    for dbname in ("postgres", "template1"):
        cluster.create_extension("pg_stat_statements", dbname)
    yield cluster
    _teardown(cluster)


@pytest.fixture(scope="session")
def pg15(clusters_dir: Path) -> Iterator[Cluster]:
    """Debian's PostgreSQL 15, with all the extensions pgfleet reads in every new database."""
    cluster = start_pg15(
        clusters_dir / "pg15", PG15_EXTENSIONS, {"max_connections": MAX_CONNECTIONS}
    )
    for dbname in ("postgres", "template1"):
        for ext in PG15_EXTENSIONS:
            cluster.create_extension(ext, dbname)
    yield cluster
    _teardown(cluster)


@pytest.fixture(scope="session")
def pg15_standby(pg15: Cluster, clusters_dir: Path) -> Iterator[Cluster]:
    """A hot standby of `pg15`; call its `wait_replay()` before looking for your changes."""
    try:
        standby = pg15.standby(clusters_dir / "pg15_standby", name="pg15_standby")
    except ClusterError as ex:
        error = str(ex)
    else:
        _started.append(standby)
        yield standby
        _teardown(standby)
        return
    pytest.fail(f"the standby of PostgreSQL 15 is unusable: {error}", pytrace=False)


# -- The PostgreSQL builds from npm (scripts/pgbuilds.py)
#
# The layout is scripts/pgbuilds.py's: $PGFLEET_PGBUILDS, by default
# .cache/pgbuilds in the checkout, holds MAJOR/ (bin, lib, share: a complete
# build) or MAJOR.error (the one line saying why it could not be fetched).

PGBUILD_MAJORS = (13, 14, 16, 17)


def pgbuilds_dir() -> Path:
    default = Path(__file__).resolve().parent.parent / ".cache" / "pgbuilds"
    return Path(os.environ.get("PGFLEET_PGBUILDS") or default).absolute()


def pgbuild_bin(major: int) -> Path | None:
    """The bin directory of the npm build of `major`, if it was fetched."""
    bin_dir = pgbuilds_dir() / str(major) / "bin"
    return bin_dir if (bin_dir / "postgres").exists() else None


def require_pgbuild(major: int) -> Path:
    """The bin directory of the npm build of `major`, or skip the test saying
    why it is missing (fail it on CI, where `make test` must have fetched it)."""
    if (bin_dir := pgbuild_bin(major)) is not None:
        return bin_dir
    try:
        why = (pgbuilds_dir() / f"{major}.error").read_text().strip()
    except OSError:
        why = "not fetched"
    message = (
        f"PostgreSQL {major} from npm is missing ({why}): run scripts/pgbuilds.py {major}"
        " (make venv does)"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def start_pgbuild(
    major: int, datadir: Path, settings: dict[str, str | int] | None = None
) -> Cluster:
    """The npm build of `major` started in `datadir`, pg_stat_statements
    preloaded (skip the test if the build was not fetched)."""
    cluster = Cluster(
        require_pgbuild(major),
        datadir,
        shared_preload_libraries=["pg_stat_statements"],
        settings=settings,
        name=datadir.name,
    )
    return _start(cluster, f"PostgreSQL {major} from npm ({datadir.name})")


class PgBuilds:
    """The session's clusters of npm builds, each started on first use.

    `prestart()` starts several in parallel (initdb is most of a start, and
    single-threaded): a test module that needs them all asks first.
    """

    def __init__(self, clusters_dir: Path) -> None:
        self._dir = clusters_dir
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(PGBUILD_MAJORS), thread_name_prefix="pgbuild"
        )
        self._lock = threading.Lock()
        self._futures: dict[int, concurrent.futures.Future[Cluster]] = {}

    def _future(self, major: int) -> concurrent.futures.Future[Cluster]:
        with self._lock:
            if major not in self._futures:
                self._futures[major] = self._pool.submit(
                    start_pgbuild,
                    major,
                    self._dir / f"pg{major}",
                    {"max_connections": MAX_CONNECTIONS},
                )
            return self._futures[major]

    def prestart(self, majors: Iterable[int]) -> None:
        """Start these majors' clusters in the background (those that were fetched)."""
        for major in majors:
            if pgbuild_bin(major) is not None:
                self._future(major)

    def get(self, major: int) -> Cluster:
        """The started cluster of `major` (a skip or failure of its start is raised here)."""
        return self._future(major).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fut in self._futures.values():
            if fut.exception() is None:
                _teardown(fut.result())


@pytest.fixture(scope="session")
def pgbuilds(clusters_dir: Path) -> Iterator[PgBuilds]:
    """The npm builds' clusters (see `PgBuilds`), torn down at the end."""
    builds = PgBuilds(clusters_dir)
    yield builds
    builds.close()


def _pgbuild(builds: PgBuilds, major: int) -> Cluster:
    cluster = builds.get(major)
    for dbname in ("postgres", "template1"):
        cluster.create_extension("pg_stat_statements", dbname)
    return cluster


@pytest.fixture(scope="session")
def pg13(pgbuilds: PgBuilds) -> Cluster:
    """PostgreSQL 13 from npm, with pg_stat_statements in every new database."""
    return _pgbuild(pgbuilds, 13)


@pytest.fixture(scope="session")
def pg14(pgbuilds: PgBuilds) -> Cluster:
    """PostgreSQL 14 from npm, with pg_stat_statements in every new database."""
    return _pgbuild(pgbuilds, 14)


@pytest.fixture(scope="session")
def pg16(pgbuilds: PgBuilds) -> Cluster:
    """PostgreSQL 16 from npm, with pg_stat_statements in every new database."""
    return _pgbuild(pgbuilds, 16)


@pytest.fixture(scope="session")
def pg17(pgbuilds: PgBuilds) -> Cluster:
    """PostgreSQL 17 from npm, with pg_stat_statements in every new database."""
    return _pgbuild(pgbuilds, 17)


@pytest.fixture(params=["pg15", "pg18"])
def monitored(request: pytest.FixtureRequest) -> Cluster:
    """Each monitored server version in turn."""
    cluster: Cluster = request.getfixturevalue(request.param)
    return cluster


_db_numbers = itertools.count(1)
_cluster_numbers = itertools.count(1)


@pytest.fixture
def new_database(request: pytest.FixtureRequest) -> NewDatabase:
    """A factory: ``new_database(cluster)`` creates an empty database and returns its dsn.

    The databases are left behind: their clusters go at the end of the session.
    """

    def new_database(cluster: Cluster) -> str:
        # Named after the test, for whoever has to read a server log.
        slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")
        return cluster.create_database(f"t{next(_db_numbers)}_{slug}"[:63])

    return new_database


@pytest.fixture
def new_cluster(clusters_dir: Path) -> Iterator[NewCluster]:
    """A factory: ``new_cluster(name, **kwargs)`` starts a private embedded cluster.

    `kwargs` go to `Cluster.embedded()`. The clusters are destroyed after the test.
    """
    made: list[Cluster] = []

    def new_cluster(name: str, **kwargs: Any) -> Cluster:
        # Numbered, as parametrized tests would ask for the same name.
        datadir = clusters_dir / f"{name}-{next(_cluster_numbers)}"
        cluster = Cluster.embedded(datadir, name=name, **kwargs)
        made.append(cluster)
        return _start(cluster, f"the cluster {name!r}")

    yield new_cluster
    for cluster in reversed(made):
        _teardown(cluster)

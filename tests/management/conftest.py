"""Fixtures shared by the management tests that run a real daemon."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgfleet.cluster import Cluster
from tests.fix_clusters import NewDatabase
from tests.fix_repository import new_repository


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    """A fresh repository, on the module's own cluster (see fix_daemon):
    daemons send it many statements, which would crowd the session clusters."""
    return new_repository(repo_cluster, new_database)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for the socket: pytest's are too deep for sun_path's 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pgf-"))
    yield path / "run"
    shutil.rmtree(path, ignore_errors=True)

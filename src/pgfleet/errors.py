"""The small exception hierarchy every pgfleet command reports through.

Each error's message is one readable line naming the bad thing; the CLI prints
it as is and exits non-zero.
"""

from __future__ import annotations


class PgfleetError(Exception):
    """Base class of every error pgfleet reports to a user."""


class ConfigError(PgfleetError):
    """An invalid configuration file or command-line argument."""


class RepositoryError(PgfleetError):
    """The repository database cannot be reached or is not in the expected state."""


class ServerError(PgfleetError):
    """A monitored server cannot be reached, authenticated against or queried."""


class SourceError(PgfleetError):
    """One datasource failed on one server; the other sources are unaffected."""

    def __init__(self, module: str, message: str) -> None:
        super().__init__(f"{module}: {message}")
        self.module = module
        self.reason = message


class ClusterError(PgfleetError):
    """A throwaway or embedded PostgreSQL cluster could not be created or started."""

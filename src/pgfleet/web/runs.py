"""Work the UI does on monitored servers on demand (index advice, plans):
who may start what, and what came of it.

What must always hold:

- Nothing here starts on a page load: a run is started by a POST (see
  :mod:`.app`), and its result is kept in this process's memory for the
  session that asked, never in the cookie nor the repository.
- One run of a kind at a time per user (role name, across its sessions):
  starting another index advice while one is under way (or another plan) is
  refused with :class:`Refused`, saying so; nothing queues (a queued run
  would start when nobody waits for it any more).
- One index advice at a time per server, whoever asks, and at most
  ``max_running`` runs in the whole process: a monitored server is never
  asked for two advice runs at once by the UI.
- At most ``per_window`` starts of a kind per user and per client address
  in ``window`` seconds (:class:`.throttle.LoginThrottle`, every start
  counted as an attempt that never "succeeds").
- Memory stays bounded: a session keeps its last ``per_session`` results,
  the process ``max_results``, none older than ``keep`` seconds.
- A run never outlives what asked for it: a logout cancels its session's
  runs (:meth:`Runs.forget`), the app's shutdown every run (:meth:`Runs.close`).
  A run cancelled or failed says why in ``error``.

I/O-free but for the tasks it runs: the caller gives the work as a coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgfleet.errors import PgfleetError
from pgfleet.web.throttle import LoginThrottle, Throttled

logger = logging.getLogger("pgfleet.web")

ADVICE, PLAN = "advice", "plan"
_WHAT = {ADVICE: "index advice", PLAN: "plan"}


class Refused(PgfleetError):
    """A run that may not start now: the message says why, and when to retry."""


@dataclass(frozen=True)
class Limits:
    # Starts per user and per client address, per kind, in `window` seconds.
    per_window: dict[str, int] = field(default_factory=lambda: {ADVICE: 10, PLAN: 30})
    window: float = 600.0
    # Runs under way in the whole process, at most.
    max_running: int = 4
    # Results kept: per session, in all, and for how long (seconds).
    per_session: int = 20
    max_results: int = 2000
    keep: float = 3600.0


@dataclass
class Run:
    """One run and, once it is over, its result or why there is none."""

    id: int
    kind: str
    key: tuple[Hashable, ...]  # what it is about: (srvid, datname), (srvid, queryid, datname)
    sid: str
    username: str
    params: dict[str, Any]  # what it was asked with, for the page (the range...)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_mono: float = field(default_factory=time.monotonic)
    finished: datetime | None = None
    seconds: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    work: Coroutine[Any, Any, dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def state(self) -> str:
        if self.finished is None:
            return "running"
        return "failed" if self.error is not None else "done"

    def elapsed(self) -> float:
        if self.seconds is not None:
            return self.seconds
        return time.monotonic() - self.started_mono

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "started": self.started,
            "finished": self.finished,
            "seconds": round(self.elapsed(), 3),
            **self.params,
            "error": self.error,
            "result": self.result,
        }


class Runs:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._throttles = {
            kind: LoginThrottle(n, self.limits.window) for kind, n in self.limits.per_window.items()
        }
        self._ids = itertools.count(1)
        # Every run kept, oldest first.
        self._runs: dict[int, Run] = {}
        self.stats: Counter[str] = Counter()

    def get_stats(self) -> dict[str, int]:
        return {**self.stats, "running": len(self._running()), "kept": len(self._runs)}

    def _running(self) -> list[Run]:
        return [r for r in self._runs.values() if r.finished is None]

    def start(
        self,
        kind: str,
        key: tuple[Hashable, ...],
        *,
        sid: str,
        username: str,
        address: str,
        params: dict[str, Any],
        work: Coroutine[Any, Any, dict[str, Any]],
        server: int | None = None,
    ) -> Run:
        """Start `work` (closed unstarted if refused: `Refused` says why).
        `server`: the srvid an index advice runs on, one at a time."""
        try:
            self._may_start(kind, username, address, server)
        except Refused:
            work.close()
            self.stats["refused"] += 1
            raise
        run = Run(next(self._ids), kind, key, sid, username, params, work=work)
        if server is not None:
            run.params.setdefault("srvid", server)
        self._runs[run.id] = run
        run.task = asyncio.create_task(self._run(run, work), name=f"pgfleet web {kind} {run.id}")
        self.stats[f"started_{kind}"] += 1
        # Who asked what of which server: the only actions the UI takes on them.
        logger.info("%s %s started by %r from %s", _WHAT.get(kind, kind), _about(key, params),
                    username, address)  # fmt: skip
        self._prune()
        return run

    def _may_start(self, kind: str, username: str, address: str, server: int | None) -> None:
        what = _WHAT.get(kind, kind)
        running = self._running()
        mine = next((r for r in running if r.username == username and r.kind == kind), None)
        if mine is not None:
            raise Refused(
                f"your {what} started {mine.elapsed():.0f} s ago is still running: one"
                f" {what} at a time per user; try again when it is done"
            )
        if server is not None and kind == ADVICE:
            busy = next(
                (r for r in running if r.kind == ADVICE and r.params.get("srvid") == server), None
            )
            if busy is not None:
                raise Refused(
                    f"an index advice on this server started {busy.elapsed():.0f} s ago (by"
                    " another session) is still running: one at a time per server; try again"
                    " when it is done"
                )
        if len(running) >= self.limits.max_running:
            raise Refused(
                f"the web UI already runs {len(running)} index advice or plans at once (at most"
                f" {self.limits.max_running}): try again in a minute"
            )
        throttle = self._throttles.get(kind)
        if throttle is not None:
            try:
                throttle.begin(address, username)
            except Throttled:
                raise Refused(
                    f"at most {throttle.limit} {what} runs per {self.limits.window / 60:.0f}"
                    " minutes per user and per address: try again later"
                ) from None

    async def _run(self, run: Run, work: Coroutine[Any, Any, dict[str, Any]]) -> None:
        try:
            run.result = await work
        except asyncio.CancelledError:
            run.error = "cancelled: the session ended or the web UI stopped"
            raise
        except Exception as e:
            # What the backend lets through (its results carry their own
            # reasons): the repository busy or gone, a server entry missing.
            run.error = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.stats[f"failed_{run.kind}"] += 1
        finally:
            run.seconds = time.monotonic() - run.started_mono
            run.finished = datetime.now(UTC)
            run.work = None
            logger.log(
                logging.WARNING if run.error else logging.INFO,
                "%s %s for %r: %s in %.1f s%s", _WHAT.get(run.kind, run.kind),
                _about(run.key, run.params), run.username, run.state, run.seconds,
                f": {run.error}" if run.error else "",
            )  # fmt: skip

    async def wait(self, run: Run) -> Run:
        """Wait for `run` to finish; it goes on (and its result is kept)
        if the waiter is cancelled."""
        if run.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(run.task)
        return run

    def latest(self, sid: str, kind: str, key: tuple[Hashable, ...]) -> Run | None:
        """The session's last run of `kind` about `key`."""
        self._prune()
        found = None
        for run in self._runs.values():
            if run.sid == sid and run.kind == kind and run.key == key:
                found = run
        return found

    async def forget(self, sid: str | None) -> None:
        """Cancel and drop the runs of a session (it logged out)."""
        if not sid:
            return
        runs = [r for r in self._runs.values() if r.sid == sid]
        for r in runs:
            del self._runs[r.id]
        await _cancel(runs)

    async def close(self) -> None:
        runs = list(self._runs.values())
        self._runs.clear()
        await _cancel(runs)

    def _prune(self) -> None:
        """Drop finished runs past `keep`, past `per_session` in a session,
        past `max_results` in all (the oldest first; a run under way stays)."""
        now = time.monotonic()
        per_sid: Counter[str] = Counter()
        done = [r for r in reversed(self._runs.values()) if r.finished is not None]
        for kept, r in enumerate(done, 1):  # newest first
            per_sid[r.sid] += 1
            if (
                now - r.started_mono > self.limits.keep
                or per_sid[r.sid] > self.limits.per_session
                or kept > self.limits.max_results
            ):
                del self._runs[r.id]
        for t in self._throttles.values():
            t.prune()


def _about(key: tuple[Hashable, ...], params: dict[str, Any]) -> str:
    """What a run is about, for the log: server, database, statement."""
    parts = [f"server {params['srvid']}"] if "srvid" in params else [repr(key)]
    if params.get("database") is not None:
        parts.append(f"database {str(params['database'])[:80]!r}")
    if "queryid" in params:
        parts.append(f"statement {params['queryid']}")
    return ", ".join(parts)


async def _cancel(runs: list[Run]) -> None:
    tasks = [r.task for r in runs if r.task is not None]
    for t in tasks:
        if not t.done():
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for r in runs:
        # A task cancelled before it ever ran never saw its work.
        if r.work is not None and inspect.getcoroutinestate(r.work) == inspect.CORO_CREATED:
            r.work.close()
        if r.finished is None:
            r.error = "cancelled: the session ended or the web UI stopped"
            r.seconds = time.monotonic() - r.started_mono
            r.finished = datetime.now(UTC)

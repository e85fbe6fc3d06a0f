"""``pgfleet web``: the fleet, a server, a database and a query over any time
range; two periods compared; index advice and generic plans asked of a
monitored server on demand (:mod:`.runs`).

Server-rendered pages (Jinja2, autoescaped) whose charts (uPlot) load the
page's JSON twin: every page at ``PATH`` has its data at ``PATH.json``, with
the same query string.  All repository SQL is in
:mod:`pgfleet.repository.reads`.  Logging in (SCRAM only) is
:mod:`.sessions`, throttled by :mod:`.throttle`; the repository connections
and their bounds are :mod:`.pools`.  See docs/web.md.
"""

from __future__ import annotations

from pgfleet.web.app import create_app, serve

__all__ = ["create_app", "serve"]

"""The collector daemon (``pgfleet collector``, ``pgfleet run``).

- :mod:`.daemon`: the process -- life cycle, signals, reload, the fleet loop;
- :mod:`.worker`: one task per server, fetching its snapshots on schedule;
- :mod:`.writer`: stores them in order, or spools them (:mod:`.spool`);
- :mod:`.link`: the repository connection, with backoff;
- :mod:`.lease`: which collector snapshots which server;
- :mod:`.discovery`: the fleet, from the repository, the config and files;
- :mod:`.commands`: the LISTEN/NOTIFY command channel;
- :mod:`.scheduler`, :mod:`.stats`, :mod:`.systemd`: small helpers;
- :mod:`.exporter`: the Prometheus endpoint.

Taking a snapshot is :mod:`pgfleet.snapshot`'s; the repository's SQL is
:mod:`pgfleet.repository`'s.
"""

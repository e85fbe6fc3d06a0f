"""Snapshots: fetch a server's sources into spools, store them in the repository.

- :mod:`.model`: the dataclasses a snapshot is made of (a leaf: the daemon's
  spool and writer, and the exporter, import nothing else of this package);
- :mod:`.wire`: libpq and COPY through psycopg's generators (the only module
  touching psycopg internals);
- :mod:`.fetch`: step 1, the sources run on the monitored server;
- :mod:`.store`: step 2, one repository transaction (and local snapshots);
- :mod:`.stream`: one-shot remote snapshots, overlapping the two steps.

Querying the monitored server before opening the repository transaction
means a slow server never holds repository locks, and the repository side
of every snapshot stays a few milliseconds long.
"""

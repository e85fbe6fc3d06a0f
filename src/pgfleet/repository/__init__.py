"""The repository database: the only place that holds repository SQL.

``schema`` applies migrations, ``servers`` owns the servers registry,
``sources`` installs the built-in datasources through the registry contract.
"""

from __future__ import annotations

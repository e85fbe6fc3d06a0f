"""pg_qualstats 2.0: predicates (quals) seen per query, per database.

pg_qualstats() reports every database, but relation, column and operator
OIDs only mean something in their own database, so this source runs in each
database (where the extension is installed) and keeps that database's quals,
which lets it write a readable ``qual`` such as ``public.orders.status = ?``
(``?`` for the constant, ``schema.table.column`` on both sides for a join
clause).

An entry on the server is the extension's own: one predicate with its
constant values (``uniquequalnodeid``) in one ``AND`` group with its constants
(``uniquequalid``, 0 outside any), per role, query and evaluation type
(``f`` filter, ``i`` index), and the delta base (``pg_qualstats_last``) is
kept per such entry: entries evicted when ``pg_qualstats.max`` is reached
simply vanish, whereas sums over constants would go backwards and look like
resets.  The history is per predicate without its constants (``qualnodeid``,
the history keys): constants come and go by the thousand on a busy server,
and a history entry per constant made this source the largest of a
repository (migration 0012).  ``qual`` and ``constvalue`` are stored once
per predicate, from the first constant seen: ``constvalue`` is an example,
truncated by the extension to 80 bytes: query data, unlike
pg_stat_statements' normalized texts.
A constant compared with a column named for a secret (``password``,
``api_token``...) is sent as a fingerprint, as settings are (docs/security.md).
At most ``pg_qualstats.max`` (1000) entries exist per server.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

DATASOURCE = Datasource(
    module="pg_qualstats",
    columns=(
        Column("datname", "text", "key"),
        Column("rolname", "text", "key"),
        Column("queryid", "bigint", "key"),
        Column("uniquequalnodeid", "bigint", "key"),
        Column("uniquequalid", "bigint", "key"),
        Column("eval_type", "text", "key"),
        Column("qualnodeid", "bigint", "once"),
        Column("qual", "text", "once"),
        Column("constvalue", "text", "once"),
        Column("occurences", "bigint", "counter"),  # sic, as the extension spells it
        Column("execution_count", "bigint", "counter"),
        Column("nbfiltered", "bigint", "counter"),
    ),
    queries={140000: "pg_qualstats.sql"},
    extension="pg_qualstats",
    per_database=True,
    scope="datname",
    history_keys=("datname", "rolname", "queryid", "qualnodeid", "eval_type"),
    priority=15,
    description="predicates per query: how often evaluated and how many rows they filtered",
)

"""What index advice asks a monitored database's catalog: no statement
text of a user's ever goes through here.

Every query names PostgreSQL's objects with their schema and runs in the
advice's READ ONLY session (:class:`~pgfleet.advice.explain.ExplainSession`)
with the collector's pinned ``search_path``: a predicate's schema, table,
column and operator names reach the server as parameters, never as SQL.
The one name composed into SQL, an extension's schema, is the server's
own ``quote_ident()`` of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgfleet.advice import quals
from pgfleet.advice.explain import ExplainSession
from pgfleet.advice.quals import ExistingIndex, Method, Predicate, Resolved, Skipped, Target

_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


_EXTENSIONS = """
SELECT a.name,
       pg_catalog.quote_ident(n.nspname::pg_catalog.text) AS schema,
       (SELECT pg_catalog.current_setting('shared_preload_libraries')) AS preload
  FROM pg_catalog.pg_available_extensions a
  LEFT JOIN pg_catalog.pg_extension e ON e.extname = a.name
  LEFT JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
 WHERE a.name IN ('hypopg', 'pg_qualstats')
"""


@dataclass(frozen=True)
class Extensions:
    """hypopg and pg_qualstats on the server and in the database."""

    available: frozenset[str]
    schemas: Mapping[str, str]  # installed in this database: name -> quoted schema
    preload: str

    def why_not(self, name: str, datname: str) -> str | None:
        """Why `name` cannot be used here, or None."""
        if name in self.schemas:
            return None
        if name not in self.available:
            return f"{name} is not available on the server (install its package)"
        return f"{name} is not installed in database {datname!r} (CREATE EXTENSION {name})"


async def extensions(s: ExplainSession) -> Extensions:
    rows = await s.fetch(_EXTENSIONS)
    return Extensions(
        available=frozenset(r["name"] for r in rows),
        schemas={r["name"]: r["schema"] for r in rows if r["schema"]},
        preload=rows[0]["preload"] if rows else "",
    )


# Each predicate's column, and the access methods whose default operator
# class for the column's type (its base type for a domain; a type binary
# coercible to it; an array, enum or range type for the polymorphic
# classes) has an operator of the predicate's name.
_RESOLVE = """
WITH t AS (
    SELECT * FROM ROWS FROM (pg_catalog.unnest(%(schemas)s::pg_catalog.text[]),
                             pg_catalog.unnest(%(tables)s::pg_catalog.text[]),
                             pg_catalog.unnest(%(columns)s::pg_catalog.text[]),
                             pg_catalog.unnest(%(ops)s::pg_catalog.text[]))
           WITH ORDINALITY AS t(nspname, relname, attname, oprname, i)
), col AS (
    SELECT t.i, t.oprname, c.oid AS relid, a.attnum, ty.oid AS typid, ty.typtype, ty.typcategory
      FROM t
      JOIN pg_catalog.pg_namespace n ON n.nspname OPERATOR(pg_catalog.=) t.nspname::pg_catalog.name
      JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid
                                AND c.relname OPERATOR(pg_catalog.=) t.relname::pg_catalog.name
                                AND c.relkind IN ('r', 'm', 'p')
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                    AND a.attname OPERATOR(pg_catalog.=) t.attname::pg_catalog.name
      JOIN pg_catalog.pg_type ty0 ON ty0.oid = a.atttypid
      JOIN pg_catalog.pg_type ty
        ON ty.oid = CASE WHEN ty0.typtype = 'd' THEN ty0.typbasetype ELSE ty0.oid END
)
SELECT col.i, col.relid::pg_catalog.int8 AS relid, col.attnum, m.amname, m.opcname, m.equality
  FROM col
  LEFT JOIN LATERAL (
    SELECT DISTINCT am.amname::pg_catalog.text AS amname, opc.opcname::pg_catalog.text AS opcname,
           (am.amname = 'btree' AND ao.amopstrategy = 3)
             OR (am.amname = 'hash' AND ao.amopstrategy = 1) AS equality
      FROM pg_catalog.pg_opclass opc
      JOIN pg_catalog.pg_am am ON am.oid = opc.opcmethod AND am.amtype = 'i'
      JOIN pg_catalog.pg_amop ao ON ao.amopfamily = opc.opcfamily AND ao.amoppurpose = 's'
                                AND ao.amoplefttype = opc.opcintype
      JOIN pg_catalog.pg_operator o ON o.oid = ao.amopopr
     WHERE opc.opcdefault
       AND o.oprname OPERATOR(pg_catalog.=) col.oprname::pg_catalog.name
       AND (opc.opcintype = col.typid
            OR EXISTS (SELECT FROM pg_catalog.pg_cast k
                        WHERE k.castsource = col.typid AND k.casttarget = opc.opcintype
                          AND k.castmethod = 'b')
            OR (opc.opcintype = 'pg_catalog.anyarray'::pg_catalog.regtype
                AND col.typcategory = 'A')
            OR (opc.opcintype = 'pg_catalog.anyenum'::pg_catalog.regtype AND col.typtype = 'e')
            OR (opc.opcintype = 'pg_catalog.anyrange'::pg_catalog.regtype AND col.typtype = 'r'))
  ) m ON true
"""


async def resolve(
    s: ExplainSession, preds: Sequence[Predicate]
) -> tuple[list[Resolved], list[Skipped]]:
    """Each predicate's column and access methods, from the catalog; the
    predicates that cannot have an index, and why."""
    skipped: list[Skipped] = []
    targets: list[tuple[Predicate, Target]] = []
    for p in preds:
        target = quals.parse(p.qual)
        if isinstance(target, str):
            skipped.append(Skipped(p.qual, p.queryid, p.eval_type, target))
        elif target.schema in _SYSTEM_SCHEMAS or target.schema.startswith("pg_"):
            continue  # the system catalogs: not for us to index
        else:
            targets.append((p, target))
    if not targets:
        return [], skipped
    rows = await s.fetch(
        _RESOLVE,
        {
            "schemas": [t.schema for _, t in targets],
            "tables": [t.table for _, t in targets],
            "columns": [t.column for _, t in targets],
            "ops": [t.operator for _, t in targets],
        },
    )
    found: dict[int, tuple[int, int, list[Method]]] = {}
    for r in rows:
        relid, attnum, methods = found.setdefault(r["i"], (r["relid"], r["attnum"], []))
        if r["amname"] is not None:
            m = Method(r["amname"], r["opcname"], bool(r["equality"]))
            if m not in methods and not any(x.am == m.am and x.opclass == m.opclass
                                            for x in methods):  # fmt: skip
                methods.append(m)
            elif m.equality:
                # The same class seen through another of its operators'
                # rows: equality wins.
                methods[:] = [m if (x.am, x.opclass) == (m.am, m.opclass) else x
                              for x in methods]  # fmt: skip
    resolved = []
    for i, (p, target) in enumerate(targets, start=1):
        if i not in found:
            skipped.append(Skipped(p.qual, p.queryid, p.eval_type,
                                   "no such column in the database now"))  # fmt: skip
            continue
        relid, attnum, methods = found[i]
        methods.sort(key=_preference)
        if not methods and p.eval_type == "f":
            skipped.append(Skipped(
                p.qual, p.queryid, p.eval_type,
                f"no index access method has operator {target.operator} for this column's type",
            ))  # fmt: skip
        resolved.append(Resolved(p, target, int(relid), int(attnum), tuple(methods)))
    return resolved, skipped


def _preference(m: Method) -> tuple[int, str]:
    order = quals.METHODS.index(m.am) if m.am in quals.METHODS else len(quals.METHODS)
    return (order, m.am)


async def live_qualids(
    s: ExplainSession, ext: Extensions, preds: Sequence[Predicate]
) -> dict[tuple[int, int], frozenset[int]]:
    """Which predicates the live pg_qualstats saw ANDed (its ``qualid``s),
    for those it still has; nothing if it is not in this database."""
    schema = ext.schemas.get("pg_qualstats")
    if schema is None:
        return {}
    query = sql.SQL(
        """SELECT q.queryid, q.qualnodeid,
                  pg_catalog.array_agg(DISTINCT q.qualid) FILTER (WHERE q.qualid IS NOT NULL)
                    AS qualids
             FROM {}.pg_qualstats() q
            WHERE q.dbid = (SELECT d.oid FROM pg_catalog.pg_database d
                             WHERE d.datname = pg_catalog.current_database())
              AND q.queryid = ANY (%(ids)s)
            GROUP BY 1, 2"""
    ).format(sql.SQL(schema))
    try:
        async with s.savepoint():
            rows = await s.fetch(query, {"ids": sorted({p.queryid for p in preds})})
    except psycopg.Error:
        # An older pg_qualstats, a role it hides queryids from: the
        # repository's grouping (a statement's predicates on a table) stays.
        return {}
    return {
        (int(r["queryid"]), int(r["qualnodeid"])): frozenset(int(q) for q in r["qualids"] or ())
        for r in rows
        if r["queryid"] is not None
    }


_INDEXES = """
SELECT pg_catalog.quote_ident(n.nspname::pg_catalog.text) || '.'
         || pg_catalog.quote_ident(ic.relname::pg_catalog.text) AS name,
       i.indrelid::pg_catalog.int8 AS relid, am.amname::pg_catalog.text AS am,
       (i.indkey::pg_catalog.int2[])[0:i.indnkeyatts - 1] AS attnums,
       ARRAY(SELECT (SELECT coalesce(pg_catalog.string_agg(DISTINCT o.oprname::pg_catalog.text,
                                                             ' '), '')
                       FROM pg_catalog.pg_opclass opc
                       JOIN pg_catalog.pg_amop ao ON ao.amopfamily = opc.opcfamily
                                                 AND ao.amoppurpose = 's'
                       JOIN pg_catalog.pg_operator o ON o.oid = ao.amopopr
                      WHERE opc.oid = cls.oid)
               FROM pg_catalog.unnest(i.indclass::pg_catalog.oid[]) WITH ORDINALITY AS cls(oid, k)
              WHERE cls.k <= i.indnkeyatts
              ORDER BY cls.k) AS operators,
       i.indisunique AS unique, i.indisprimary AS primary,
       i.indisvalid AND i.indisready AS valid, i.indpred IS NOT NULL AS partial,
       pg_catalog.pg_get_indexdef(i.indexrelid) AS definition
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = ic.relnamespace
  JOIN pg_catalog.pg_am am ON am.oid = ic.relam
 WHERE i.indrelid = ANY (%(relids)s::pg_catalog.oid[])
"""


async def indexes(s: ExplainSession, relids: Sequence[int]) -> list[ExistingIndex]:
    if not relids:
        return []
    rows = await s.fetch(_INDEXES, {"relids": list(relids)})
    return [
        ExistingIndex(
            name=r["name"],
            relid=int(r["relid"]),
            am=r["am"],
            attnums=tuple(int(a) for a in r["attnums"]),
            operators=tuple(frozenset(ops.split()) for ops in r["operators"]),
            unique=r["unique"],
            primary=r["primary"],
            valid=r["valid"],
            partial=r["partial"],
            definition=r["definition"],
        )
        for r in rows
    ]

"""Every built-in source's SQL names PostgreSQL's objects with their schema.

The collector's sessions search ``pg_catalog, pg_temp`` only; the SQL says
``pg_catalog.`` all the same, so that it means the same in any session (the
repository's local mode, a person trying it in psql) and against overloads
that match better than PostgreSQL's own.  A static check, of the SQL files as
shipped; tests/security/test_sources.py runs them among trojans.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest

from pgfleet import datasources

SQL_FILES = sorted(
    f.name
    for f in resources.files(datasources).joinpath("sql").iterdir()
    if f.name.endswith(".sql")
)

# Words followed by "(" that are syntax, not a function looked up by name.
SYNTAX = frozenset((
    "select", "from", "join", "on", "and", "or", "not", "in", "as", "using", "when", "then",
    "else", "over", "filter", "exists", "coalesce", "greatest", "least", "nullif", "extract",
    "row", "array", "values", "with", "where", "by", "case", "lateral", "cast", "all", "any",
    "some", "is", "distinct",
))  # fmt: skip
# Type names the grammar itself turns into pg_catalog's types.
KEYWORD_TYPES = frozenset((
    "integer", "int", "smallint", "bigint", "real", "float", "numeric", "decimal", "boolean",
    "double",
))  # fmt: skip


# FROM or JOIN and the name after it; LATERAL and a subquery read no relation.
RELATION = r"\b(?:FROM|JOIN)\s+(?:LATERAL\s+)?(?!LATERAL\b)([\w.@:]+)"


def _code(text: str) -> str:
    """The SQL without comments and string constants (single- or dollar-quoted)."""
    text = re.sub(r"--[^\n]*", " ", text)
    text = re.sub(r"\$(\w*)\$.*?\$\1\$", " '' ", text, flags=re.S)
    return re.sub(r"'(?:[^']|'')*'", " '' ", text)


def _ctes(code: str) -> set[str]:
    return {m.lower() for m in re.findall(r"\b(\w+)\s+AS\s+(?:MATERIALIZED\s+)?\(", code, re.I)}


@pytest.mark.parametrize("name", SQL_FILES)
def test_functions_relations_and_types_are_qualified(name: str) -> None:
    code = _code(datasources.load_sql(name))
    problems = []
    # A function call: a name and "(", not after a dot (schema.name) nor an
    # @extschema:NAME@ marker.
    for m in re.finditer(r"(?<![.\w@])([A-Za-z_]\w*)\s*\(", code):
        if m[1].lower() not in SYNTAX:
            problems.append(f"function {m[1]}()")
    # A relation read: FROM or JOIN and a name, unless it is a CTE's.
    ctes = _ctes(code)
    for m in re.finditer(RELATION, code, re.I):
        target = m[1]
        if "." not in target and target.lower() not in ctes:
            problems.append(f"relation {target}")
    # A cast to a type looked up by name.
    for m in re.finditer(r"::\s*([\w.]+)", code):
        if "." not in m[1] and m[1].lower() not in KEYWORD_TYPES:
            problems.append(f"type {m[1]}")
    assert not problems, f"{name}: unqualified {', '.join(problems)}"


def test_the_check_sees_what_it_should() -> None:
    """The patterns above find unqualified names (and only those)."""
    code = _code(
        "WITH q AS (SELECT 1) SELECT now(), pg_catalog.now(), x::text, x::bigint,"
        " count(*) OVER (PARTITION BY a) -- from ignored(\n"
        "  FROM pg_stat_activity a JOIN q ON true CROSS JOIN @extschema:e@.f() k"
        "  LEFT JOIN LATERAL (SELECT 1 FROM pg_index) i ON true JOIN LATERAL g(a) ON true"
        " WHERE s ~ $re$x(y)$re$ AND t = 'z('"
    )
    assert re.findall(r"(?<![.\w@])([A-Za-z_]\w*)\s*\(", code) == [
        "AS", "now", "count", "OVER", "LATERAL", "g",
    ]  # fmt: skip
    assert _ctes(code) == {"q"}
    assert re.findall(RELATION, code, re.I) == [
        "pg_stat_activity", "q", "@extschema:e@.f", "pg_index", "g",
    ]  # fmt: skip

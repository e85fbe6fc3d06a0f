"""Predicates into candidates, and covering, without a server: the rules of
pgfleet.advice.quals on hand-made catalogs (the end-to-end test has the real
ones)."""

from __future__ import annotations

from pgfleet.advice import quals
from pgfleet.advice.quals import (
    Candidate,
    ExistingIndex,
    Method,
    Predicate,
    Resolved,
    Target,
    Thresholds,
)

BTREE_EQ = Method("btree", "int4_ops", True)
BTREE_RANGE = Method("btree", "int4_ops", False)
GIN = Method("gin", "jsonb_ops", False)
RELID = 16400
# attnums of the table's columns
ATT = {"id": 1, "customer": 2, "amount": 3, "doc": 4, "status": 5}


def _pred(
    qual: str,
    queryid: int = 1,
    *,
    eval_type: str = "f",
    seen: float = 100_000,
    removed: float = 99_000,
    runs: float = 1,
    node: int | None = None,
) -> Predicate:
    return Predicate(
        datname="app", queryid=queryid, qualnodeid=node or hash(qual) & 0xFFFF,
        eval_type=eval_type, qual=qual, constvalue=None, rolname="app",
        occurences=runs, execution_count=seen, nbfiltered=removed,
    )  # fmt: skip


def _resolved(p: Predicate, *methods: Method) -> Resolved:
    target = quals.parse(p.qual)
    assert isinstance(target, Target), target
    return Resolved(p, target, RELID, ATT[target.column], methods)


def _index(
    name: str, *columns: str, am: str = "btree", unique: bool = False, ops: str = "< <= = >= >",
    partial: bool = False, valid: bool = True,
) -> ExistingIndex:  # fmt: skip
    return ExistingIndex(
        name=name, relid=RELID, am=am, attnums=tuple(ATT[c] for c in columns),
        operators=tuple(frozenset(ops.split()) for _ in columns), unique=unique,
        primary=unique, valid=valid, partial=partial, definition=f"INDEX {name}",
    )  # fmt: skip


def _candidates(*rs: Resolved, qualids: dict[tuple[int, int], frozenset[int]] | None = None
                ) -> list[Candidate]:  # fmt: skip
    return quals.fold(quals.candidates(quals.groups(rs, qualids or {}), Thresholds()))


def test_parse_names_as_quote_ident_wrote_them() -> None:
    t = quals.parse('public."Order Lines"."a.b ""c""" @> ?')
    assert isinstance(t, Target)
    assert (t.schema, t.table, t.column, t.operator) == ("public", "Order Lines", 'a.b "c"', "@>")
    assert (t.qschema, t.qtable) == ("public", '"Order Lines"')
    assert quals.parse("public.t.a = public.u.b") == (
        "a join clause (a column compared with another column): not indexed here"
    )
    dropped = quals.parse("16384.2 = ?")
    assert isinstance(dropped, str) and "dropped" in dropped
    assert isinstance(quals.parse("nonsense"), str)


def test_anded_predicates_make_one_index_equality_first() -> None:
    amount = _resolved(_pred("public.orders.amount > ?", removed=60_000), BTREE_RANGE)
    customer = _resolved(_pred("public.orders.customer = ?", removed=39_000), BTREE_EQ)
    (c,) = _candidates(amount, customer)
    assert c.qcolumns == ("customer", "amount")
    assert c.ddl() == "CREATE INDEX ON public.orders USING btree (customer, amount)"


def test_gin_only_operators_get_their_own_gin_index() -> None:
    # The same statement's ANDed `customer = ?` and `doc @> ?`: no btree can
    # serve @> (powa-web #97), so two candidates.
    customer = _resolved(_pred("public.orders.customer = ?"), BTREE_EQ)
    doc = _resolved(_pred("public.orders.doc @> ?", removed=500), GIN)
    got = {(c.am, c.qcolumns) for c in _candidates(customer, doc)}
    assert got == {("btree", ("customer",)), ("gin", ("doc",))}
    # An operator no index has: no candidate, whatever it filters.
    nothing = _resolved(_pred("public.orders.doc ~~ ?"))
    assert _candidates(nothing) == []


def test_what_is_worth_an_index() -> None:
    # Filters that remove too little, together, make no candidate...
    few = _resolved(_pred("public.orders.customer = ?", seen=100_000, removed=20_000), BTREE_EQ)
    assert _candidates(few) == []
    small = _resolved(_pred("public.orders.customer = ?", seen=500, removed=499), BTREE_EQ)
    assert _candidates(small) == []
    # ...but ANDed, what each removes adds up (a row is removed once).
    a = _resolved(_pred("public.orders.customer = ?", seen=10_000, removed=2_000), BTREE_EQ)
    b = _resolved(_pred("public.orders.amount > ?", seen=8_000, removed=2_000), BTREE_RANGE)
    assert [c.qcolumns for c in _candidates(a, b)] == [("customer", "amount")]
    # A predicate already served by an index starts nothing, and leads.
    indexed = _resolved(_pred("public.orders.id = ?", eval_type="i", removed=0), BTREE_EQ)
    assert _candidates(indexed) == []
    amount = _resolved(_pred("public.orders.amount > ?"), BTREE_RANGE)
    assert [c.qcolumns for c in _candidates(amount, indexed)] == [("id", "amount")]


def test_or_ed_predicates_known_live_are_separate_indexes() -> None:
    a = _resolved(_pred("public.orders.customer = ?", node=11), BTREE_EQ)
    b = _resolved(_pred("public.orders.amount = ?", node=12), BTREE_EQ)
    # Unknown to the live pg_qualstats: ANDed.
    assert [c.qcolumns for c in _candidates(a, b)] == [("customer", "amount")]
    # Known, without a qualid each (an OR): one index each.
    alone = {(1, 11): frozenset[int](), (1, 12): frozenset[int]()}
    got = sorted(c.qcolumns for c in _candidates(a, b, qualids=alone))
    assert got == [("amount",), ("customer",)]
    # Known in one AND group.
    anded = {(1, 11): frozenset({7}), (1, 12): frozenset({7})}
    assert [c.qcolumns for c in _candidates(a, b, qualids=anded)] == [("customer", "amount")]


def test_same_index_from_several_statements_is_one_candidate() -> None:
    one = _resolved(_pred("public.orders.customer = ?", queryid=1), BTREE_EQ)
    two = _resolved(_pred("public.orders.customer = ?", queryid=2), BTREE_EQ)
    (c,) = _candidates(one, two)
    assert c.queryids == [1, 2]
    # A btree that starts another is folded into it: the longer serves both.
    three = _resolved(_pred("public.orders.customer = ?", queryid=3), BTREE_EQ)
    amount = _resolved(_pred("public.orders.amount > ?", queryid=3), BTREE_RANGE)
    (c,) = _candidates(one, three, amount)
    assert c.qcolumns == ("customer", "amount") and c.queryids == [1, 3]


def _one(*rs: Resolved) -> Candidate:
    (c,) = quals.candidates(quals.groups(rs, {}), Thresholds())
    return c


def test_covering() -> None:
    customer = _one(_resolved(_pred("public.orders.customer = ?"), BTREE_EQ))
    # Same leading column, or more columns after it.
    assert quals.covering(customer, [_index("c", "customer")]) is not None
    assert quals.covering(customer, [_index("ca", "customer", "amount")]) is not None
    # Not as a second column, not partial, not invalid, not another table's.
    assert quals.covering(customer, [_index("ac", "amount", "customer")]) is None
    assert quals.covering(customer, [_index("p", "customer", partial=True)]) is None
    assert quals.covering(customer, [_index("v", "customer", valid=False)]) is None
    other = _index("o", "customer")
    other = ExistingIndex(**{**other.__dict__, "relid": RELID + 1})
    assert quals.covering(customer, [other]) is None
    # An operator family without the operator (text_pattern_ops has no <).
    assert quals.covering(customer, [_index("pat", "customer", ops="~<~ ~>~")]) is None
    # Two equality columns: any order of the same leading columns.
    both = _one(_resolved(_pred("public.orders.customer = ?"), BTREE_EQ),
                _resolved(_pred("public.orders.amount = ?"), BTREE_EQ))  # fmt: skip
    assert quals.covering(both, [_index("ac", "amount", "customer")]) is not None
    assert quals.covering(both, [_index("c", "customer")]) is None
    # A unique index (a primary key) on columns compared with =: one row.
    with_id = _one(_resolved(_pred("public.orders.customer = ?"), BTREE_EQ),
                   _resolved(_pred("public.orders.id = ?"), BTREE_EQ))  # fmt: skip
    assert quals.covering(with_id, [_index("pkey", "id", unique=True)]) is not None
    id_range = _one(_resolved(_pred("public.orders.id > ?"), BTREE_RANGE))
    assert quals.covering(id_range, [_index("pkey", "id", unique=True, ops="=")]) is None
    # gin: any key column.
    doc = _one(_resolved(_pred("public.orders.doc @> ?"), GIN))
    gin = _index("g", "status", "doc", am="gin", ops="@> ? ?| ?&")
    assert quals.covering(doc, [gin]) is not None

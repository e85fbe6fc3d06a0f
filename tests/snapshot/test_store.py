"""When store() looks for unchanged sources: every row of a source is read to
tell, which a source changing at every snapshot makes a waste."""

from __future__ import annotations

from pgfleet.snapshot.store import _BUSY, _RECHECK, _Stored


def test_a_source_changing_at_every_snapshot_is_looked_at_only_now_and_then() -> None:
    st = _Stored(snapshots=1, changes={"pg_stat_user_tables": _BUSY, "settings": 0})
    assert st.busy() == {"pg_stat_user_tables"}
    # Every _RECHECK-th snapshot, in case the server quietened down.
    assert _Stored(snapshots=_RECHECK, changes=st.changes).busy() == set()
    assert _Stored(snapshots=1, changes={"pg_stat_user_tables": _BUSY - 1}).busy() == set()

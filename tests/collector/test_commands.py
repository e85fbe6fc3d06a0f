"""Command-channel payloads, the inbox and request matching (the daemon side is in
test_daemon and tests/security/test_channel.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pgfleet.collector.commands import (
    BadRequest,
    Inbox,
    Request,
    Requests,
    answer_text,
    parse,
)
from pgfleet.repository.channel import RequestRow


def test_valid_requests() -> None:
    assert parse("RELOAD chan") == Request("RELOAD", "chan", ())
    assert parse("  workers_status   chan  12 ") == Request("WORKERS_STATUS", "chan", ("12",))
    assert parse("FORCE_SNAPSHOT - 3") == Request("FORCE_SNAPSHOT", None, ("3",))
    assert answer_text("RELOAD", False, "no") == "RELOAD KO no"


@pytest.mark.parametrize(
    "payload, reason, channel",
    [
        ("", "expected 'COMMAND RESPONSE_CHANNEL [ARGS...]'", None),
        ("RELOAD", "expected 'COMMAND RESPONSE_CHANNEL [ARGS...]'", None),
        ("RELOAD bad-chan", "invalid response channel 'bad-chan'", None),
        ("RELOAD " + "c" * 64, "invalid response channel", None),
        (
            "DROP c",
            "unknown command 'DROP': use one of RELOAD, WORKERS_STATUS, FORCE_SNAPSHOT",
            "c",
        ),
        ("FORCE_SNAPSHOT c", "FORCE_SNAPSHOT takes 1 argument(s), not 0", "c"),
        ("WORKERS_STATUS c 1 2", "WORKERS_STATUS takes 0 to 1 argument(s), not 2", "c"),
        ("FORCE_SNAPSHOT c -1", "invalid srvid '-1': expected a number", "c"),
        ("FORCE_SNAPSHOT c 99999999999", "invalid srvid", "c"),
        # Digits to str.isdigit(), not to int().
        ("FORCE_SNAPSHOT c \u00b2", "invalid srvid '\u00b2': expected a number", "c"),
        ("FORCE_SNAPSHOT c \u0663", "invalid srvid", "c"),
        # "\u017f".upper() is "S": only ASCII names are commands.
        ("FORCE_\u017fNAPSHOT c 1", "unknown command", "c"),
    ],
)
def test_bad_requests(payload: str, reason: str, channel: str | None) -> None:
    with pytest.raises(BadRequest) as exc:
        parse(payload)
    assert exc.value.reason.startswith(reason)
    assert exc.value.channel == channel


def test_unknown_commands_are_named_back_only_if_words() -> None:
    with pytest.raises(BadRequest) as exc:
        parse("BOGUS c")
    assert exc.value.command == "BOGUS"
    with pytest.raises(BadRequest) as exc:
        parse("\x1b[2J\ud800 c")
    assert exc.value.command == "ERROR" and exc.value.channel == "c"


def test_inbox_caps_each_sender_and_the_whole() -> None:
    inbox = Inbox(per_sender=3, limit=5)
    assert [inbox.put(1, f"g{i}") for i in range(5)] == [0, 0, 0, 1, 1]
    assert inbox.put(2, "a") == 0 and len(inbox) == 4
    assert inbox.take_new() == [(1, "g0"), (1, "g1"), (1, "g2"), (2, "a")]
    for pid, payload in [(1, "g0"), (1, "g1"), (1, "g2")]:
        inbox.unmatched(pid, payload)
    inbox.done(2)
    assert inbox.put(3, "b") == 0 and inbox.put(3, "c") == 0 and len(inbox) == 5
    # Full: a sender with nothing waiting gets in, the oldest unmatched of
    # another goes; one with something waiting is dropped.
    assert inbox.put(4, "d") == 1 and len(inbox) == 5
    assert inbox.put(3, "e") == 1
    assert inbox.take_new() == [(3, "b"), (3, "c"), (4, "d")]
    for pid, payload in [(3, "b"), (3, "c"), (4, "d")]:
        inbox.unmatched(pid, payload)
    # Unmatched ones are answered senders in turn.
    got = []
    while (item := inbox.next_unmatched()) is not None:
        got.append(item)
    assert got == [(1, "g1"), (3, "b"), (4, "d"), (1, "g2"), (3, "c")]
    assert len(inbox) == 0
    assert inbox.put(1, "x") == 0 and inbox.clear() == 1 and len(inbox) == 0


def test_requests_match_notifications() -> None:
    r = Requests("pgfleet_collector")
    r.since = datetime.now(UTC)

    def row(i: int, pid: int, payload: str) -> RequestRow:
        return RequestRow(i, pid, payload, "admin", True)

    batch = [(10, "RELOAD a"), (11, "RELOAD a"), (10, "RELOAD a"), (12, "x")]
    mine, garbage = r.match([row(1, 10, "RELOAD a"), row(2, 13, "RELOAD b")], batch)
    # One row, one notification: the same payload sent again by hand is garbage.
    assert mine == [(10, "RELOAD a")]
    assert garbage == [(11, "RELOAD a"), (10, "RELOAD a"), (12, "x")]
    # A request acted upon before its notification came: that one is no garbage.
    mine, garbage = r.match([], [(13, "RELOAD b"), (13, "RELOAD b")])
    assert mine == [(13, "RELOAD b")] and garbage == [(13, "RELOAD b")]

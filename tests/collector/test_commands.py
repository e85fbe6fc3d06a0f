"""Parsing of command-channel payloads (the daemon side is in test_daemon)."""

from __future__ import annotations

import pytest

from pgfleet.collector.commands import BadRequest, Request, answer_text, parse


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
    ],
)
def test_bad_requests(payload: str, reason: str, channel: str | None) -> None:
    with pytest.raises(BadRequest) as exc:
        parse(payload)
    assert exc.value.reason.startswith(reason)
    assert exc.value.channel == channel

"""Management documents: pgmoneta's shape, request checks, answers and outcomes."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from pgfleet import __version__
from pgfleet.errors import PgfleetError
from pgfleet.management import document
from pgfleet.management.document import ErrorCode, ManagementError, OutputFormat


def test_error_codes_never_change() -> None:
    """Clients and docs/management.md key on these numbers."""
    assert {c.name: c.value for c in ErrorCode} == {
        "BAD_FRAME": 1,
        "FRAME_TOO_LARGE": 2,
        "BAD_COMPRESSION": 3,
        "BAD_ENCRYPTION": 4,
        "BAD_JSON": 5,
        "BAD_DOCUMENT": 6,
        "UNKNOWN_COMMAND": 7,
        "BAD_ARGUMENTS": 8,
        "NOT_ALLOWED": 9,
        "COMMAND_FAILED": 10,
        "TIMEOUT": 11,
        "AUTH_FAILED": 12,
        "TLS_REQUIRED": 13,
        "TOO_MANY_CONNECTIONS": 14,
        "SHUTTING_DOWN": 15,
        "NOT_FOUND": 16,
    }


def test_management_error_is_one_line() -> None:
    e = ManagementError(ErrorCode.BAD_JSON, "invalid JSON:\n  line 2\r\n")
    assert isinstance(e, PgfleetError)
    assert e.code is ErrorCode.BAD_JSON and e.message == str(e) == "invalid JSON: line 2"
    assert ManagementError(ErrorCode.NOT_FOUND, "").message == "not found"


def test_request_has_pgmonetas_shape() -> None:
    doc = document.request(
        "conf get", {"key": "port"}, output_format=OutputFormat.JSON, compression=2, encryption=1
    )
    assert set(doc) == {"Header", "Request"}
    header = doc["Header"]
    assert header["Command"] == "conf get"
    assert header["ClientVersion"] == __version__
    assert header["Output"] == "json"
    assert (header["Compression"], header["Encryption"]) == (2, 1)
    assert re.fullmatch(r"\d{14}", header["Timestamp"])
    assert abs(time.mktime(time.strptime(header["Timestamp"], "%Y%m%d%H%M%S")) - time.time()) < 5
    assert doc["Request"] == {"key": "port"}
    assert document.request("ping")["Request"] == {}


def test_parse_request_round_trip() -> None:
    command, arguments, header = document.parse_request(
        document.request("status", {"details": True}, compression=4)
    )
    assert (command, arguments) == ("status", {"details": True})
    assert header["Output"] is OutputFormat.TEXT and header["Compression"] == 4
    assert header["Encryption"] == 0


def test_parse_request_defaults_and_pgmoneta_output_numbers() -> None:
    command, arguments, header = document.parse_request({"Header": {"Command": "ping"}})
    assert (command, arguments) == ("ping", {})
    assert header["Output"] is OutputFormat.TEXT
    assert (header["Compression"], header["Encryption"]) == (0, 0)
    _, _, header = document.parse_request({"Header": {"Command": "ping", "Output": 1}})
    assert header["Output"] is OutputFormat.JSON


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        "ping",
        {},
        {"Header": []},
        {"Header": {}},
        {"Header": {"Command": 9}},
        {"Header": {"Command": "  "}},
        {"Header": {"Command": "x" * 65}},
        {"Header": {"Command": "ping\u0000"}},
        {"Header": {"Command": "ping"}, "Request": [1]},
        {"Header": {"Command": "ping", "Output": "yaml"}},
        {"Header": {"Command": "ping", "Output": 7}},
        {"Header": {"Command": "ping", "Compression": "gzip"}},
        {"Header": {"Command": "ping", "Compression": True}},
        {"Header": {"Command": "ping", "Encryption": 256}},
        {"Header": {"Command": "ping", "ClientVersion": 1}},
    ],
)
def test_parse_request_refuses_wrong_shapes(doc: Any) -> None:
    with pytest.raises(ManagementError) as info:
        document.parse_request(doc)
    assert info.value.code == ErrorCode.BAD_DOCUMENT


def test_response_success() -> None:
    _, _, header = document.parse_request(
        document.request("status", output_format=OutputFormat.JSON, compression=1, encryption=1)
    )
    started = time.monotonic() - 0.25
    answer = document.response(header, "status", {"servers": 3}, started=started)
    assert set(answer) == {"Header", "Response", "Outcome"}
    assert answer["Header"]["Command"] == "status"
    assert answer["Header"]["ServerVersion"] == __version__
    assert answer["Header"]["ClientVersion"] == __version__
    assert answer["Header"]["Output"] == "json"
    assert (answer["Header"]["Compression"], answer["Header"]["Encryption"]) == (1, 1)
    assert answer["Response"] == {"servers": 3}
    outcome = answer["Outcome"]
    assert outcome["Status"] is True and set(outcome) == {"Status", "Time"}
    assert re.fullmatch(r"00:00:00\.2[5-9]\d\d", outcome["Time"]), outcome["Time"]
    assert document.outcome_error(answer) is None


def test_response_failure_and_outcome_error() -> None:
    error = ManagementError(ErrorCode.UNKNOWN_COMMAND, "unknown command 'frob'")
    answer = document.response(None, "frob", None, started=time.monotonic(), error=error)
    assert answer["Response"] == {}
    assert answer["Header"]["Compression"] == 0 and answer["Header"]["Output"] == "text"
    assert answer["Outcome"] == {
        "Status": False,
        "Time": answer["Outcome"]["Time"],
        "Error": 7,
        "Message": "unknown command 'frob'",
    }
    back = document.outcome_error(answer)
    assert back is not None
    assert (back.code, back.message) == (ErrorCode.UNKNOWN_COMMAND, "unknown command 'frob'")


def test_outcome_error_of_odd_answers() -> None:
    missing = document.outcome_error({"Header": {}})
    assert missing is not None and missing.code == ErrorCode.BAD_DOCUMENT
    newer = document.outcome_error({"Outcome": {"Status": False, "Error": 99, "Message": "x"}})
    assert newer is not None
    assert (newer.code, newer.message) == (ErrorCode.COMMAND_FAILED, "error 99: x")
    bare = document.outcome_error({"Outcome": {"Status": False, "Error": 16}})
    assert bare is not None and (bare.code, bare.message) == (ErrorCode.NOT_FOUND, "not found")


def test_elapsed_format() -> None:
    assert document.elapsed(0) == "00:00:00.0000"
    assert document.elapsed(3723.25) == "01:02:03.2500"
    assert document.elapsed(-1) == "00:00:00.0000"

"""The JSON documents of the management protocol: requests, answers, error codes.

A request has pgmoneta's shape::

    {"Header": {"Command": "status", "ClientVersion": "0.1.0", "Timestamp": "20261231235959",
                "Output": "text", "Compression": 0, "Encryption": 0},
     "Request": {"details": true}}

and its answer echoes the header and adds the result and how it went::

    {"Header": {..., "ServerVersion": "0.1.0"},
     "Response": {...},
     "Outcome": {"Status": false, "Time": "00:00:00.0012", "Error": 7, "Message": "..."}}

Invariants:

- An :class:`ErrorCode` never changes meaning once released: clients, scripts
  and docs/management.md key on the numbers.  New codes go at the end.
- Every failure the protocol reports is a :class:`ManagementError`: a code plus
  one line of text, never a multi-line traceback, so a client can print it as is.
- Nothing here does I/O: framing lives in :mod:`.frame`, sockets in the server.

pgmoneta differences, on purpose: ``Command`` is the command's name (pgmoneta
sends a number), ``Output`` is ``"text"`` or ``"json"`` (pgmoneta's 0 and 1 are
accepted too), and a failed ``Outcome`` carries a one-line ``Message`` besides
the numeric ``Error``.
"""

from __future__ import annotations

import time
from enum import IntEnum, StrEnum
from typing import Any

from pgfleet import __version__
from pgfleet.errors import PgfleetError

# pgmoneta's key names (management.h), so a reader of one protocol reads the other.
HEADER = "Header"
REQUEST = "Request"
RESPONSE = "Response"
OUTCOME = "Outcome"

COMMAND = "Command"
CLIENT_VERSION = "ClientVersion"
SERVER_VERSION = "ServerVersion"
TIMESTAMP = "Timestamp"
OUTPUT = "Output"
COMPRESSION = "Compression"
ENCRYPTION = "Encryption"
STATUS = "Status"
TIME = "Time"
ERROR = "Error"
MESSAGE = "Message"

# A command name is a word or two ("conf set"), not a payload.
MAX_COMMAND_LENGTH = 64


class ErrorCode(IntEnum):
    """Why a management request failed; the number is the ``Outcome``'s ``Error``.

    Stable: a code keeps its meaning forever (docs/management.md lists them).

    - ``BAD_FRAME`` (1): a truncated frame or a short header.
    - ``FRAME_TOO_LARGE`` (2): the frame, or what it decompresses to, is over the limit.
    - ``BAD_COMPRESSION`` (3): an unknown compression type, or corrupt compressed data.
    - ``BAD_ENCRYPTION`` (4): an unknown or unsupported encryption type, no key
      configured, or the authentication tag does not verify (wrong key, tampering).
    - ``BAD_JSON`` (5): invalid UTF-8 or JSON, nesting too deep, numbers out of range.
    - ``BAD_DOCUMENT`` (6): valid JSON of the wrong shape (no Header or Command, wrong types).
    - ``UNKNOWN_COMMAND`` (7): no such command.
    - ``BAD_ARGUMENTS`` (8): the command's arguments are missing or invalid.
    - ``NOT_ALLOWED`` (9): the command is refused here (e.g. ``reload`` remotely).
    - ``COMMAND_FAILED`` (10): the command ran and failed.
    - ``TIMEOUT`` (11): the peer was too slow (handshake, idle connection, command).
    - ``AUTH_FAILED`` (12): SCRAM authentication failed.
    - ``TLS_REQUIRED`` (13): the server requires TLS and the connection is not encrypted.
    - ``TOO_MANY_CONNECTIONS`` (14): the cap on concurrent management connections is reached.
    - ``SHUTTING_DOWN`` (15): the daemon is stopping.
    - ``NOT_FOUND`` (16): the thing named (server, setting...) does not exist.
    """

    BAD_FRAME = 1
    FRAME_TOO_LARGE = 2
    BAD_COMPRESSION = 3
    BAD_ENCRYPTION = 4
    BAD_JSON = 5
    BAD_DOCUMENT = 6
    UNKNOWN_COMMAND = 7
    BAD_ARGUMENTS = 8
    NOT_ALLOWED = 9
    COMMAND_FAILED = 10
    TIMEOUT = 11
    AUTH_FAILED = 12
    TLS_REQUIRED = 13
    TOO_MANY_CONNECTIONS = 14
    SHUTTING_DOWN = 15
    NOT_FOUND = 16


class ManagementError(PgfleetError):
    """A management request or connection failed: an :class:`ErrorCode` and one line."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        # One line whatever the caller passed: the message goes into an
        # Outcome, a log line and a terminal as is.
        message = " ".join(message.split()) or code.name.lower().replace("_", " ")
        super().__init__(message)
        self.code = code
        self.message = message


class OutputFormat(StrEnum):
    """How ``pgfleet ctl`` should print the answer; the server only echoes it."""

    TEXT = "text"
    JSON = "json"


# pgmoneta's MANAGEMENT_OUTPUT_FORMAT_TEXT and _JSON, accepted from its clients.
_PGMONETA_OUTPUT = {0: OutputFormat.TEXT, 1: OutputFormat.JSON}


def timestamp(now: float | None = None) -> str:
    """The ``Timestamp`` of a header: local time as ``YYYYMMDDHHMMSS``, as pgmoneta."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(now))


def elapsed(seconds: float) -> str:
    """The ``Time`` of an outcome: ``HH:MM:SS.ffff`` (pgmoneta's precision, seconds padded)."""
    seconds = max(0.0, seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{int(hours):02d}:{int(minutes):02d}:{secs:07.4f}"


def request(
    command: str,
    arguments: dict[str, Any] | None = None,
    *,
    output_format: OutputFormat = OutputFormat.TEXT,
    compression: int = 0,
    encryption: int = 0,
) -> dict[str, Any]:
    """Build a request document for ``command`` with ``arguments``."""
    return {
        HEADER: {
            COMMAND: command,
            CLIENT_VERSION: __version__,
            TIMESTAMP: timestamp(),
            OUTPUT: str(OutputFormat(output_format)),
            COMPRESSION: int(compression),
            ENCRYPTION: int(encryption),
        },
        REQUEST: dict(arguments or {}),
    }


def _is_int(value: Any) -> bool:
    # bool is an int to Python, not to JSON: true is no compression type.
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(doc: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Check a request's shape; return ``(command, arguments, header)``.

    The header returned is a copy with defaults filled in and ``Output``
    normalised to an :class:`OutputFormat`, so a server reads it without
    checking types again.  Raises ``ManagementError(BAD_DOCUMENT)``.
    """
    if not isinstance(doc, dict):
        raise ManagementError(ErrorCode.BAD_DOCUMENT, "the document is not a JSON object")
    header = doc.get(HEADER)
    if not isinstance(header, dict):
        raise ManagementError(ErrorCode.BAD_DOCUMENT, f"the document has no {HEADER} object")
    command = header.get(COMMAND)
    if not isinstance(command, str) or not command.strip():
        raise ManagementError(ErrorCode.BAD_DOCUMENT, f"the {HEADER} has no {COMMAND} string")
    if len(command) > MAX_COMMAND_LENGTH or not command.isprintable():
        raise ManagementError(
            ErrorCode.BAD_DOCUMENT,
            f"the {COMMAND} is not a command name (over {MAX_COMMAND_LENGTH} characters "
            "or not printable)",
        )
    arguments = doc.get(REQUEST, {})
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ManagementError(ErrorCode.BAD_DOCUMENT, f"the {REQUEST} is not a JSON object")

    clean = dict(header)
    output = header.get(OUTPUT, OutputFormat.TEXT.value)
    if _is_int(output) and output in _PGMONETA_OUTPUT:
        clean[OUTPUT] = _PGMONETA_OUTPUT[output]
    elif isinstance(output, str) and output in OutputFormat.__members__.values():
        clean[OUTPUT] = OutputFormat(output)
    else:
        raise ManagementError(
            ErrorCode.BAD_DOCUMENT, f'the {HEADER}\'s {OUTPUT} must be "text" or "json"'
        )
    for key in (COMPRESSION, ENCRYPTION):
        value = header.get(key, 0)
        if not _is_int(value) or not 0 <= value <= 255:
            raise ManagementError(
                ErrorCode.BAD_DOCUMENT, f"the {HEADER}'s {key} must be an integer 0-255"
            )
        clean[key] = value
    for key in (CLIENT_VERSION, TIMESTAMP):
        if key in header and not isinstance(header[key], str):
            raise ManagementError(ErrorCode.BAD_DOCUMENT, f"the {HEADER}'s {key} must be a string")
    return command.strip(), arguments, clean


def response(
    header: dict[str, Any] | None,
    command: str,
    result: dict[str, Any] | None,
    *,
    started: float,
    error: ManagementError | None = None,
) -> dict[str, Any]:
    """Build the answer to a request.

    ``header`` is the request's (from :func:`parse_request`), or None when the
    request could not be read at all; ``started`` is a :func:`time.monotonic`
    taken when the request arrived.  With ``error`` the outcome is a failure
    carrying its code and message; ``result`` is then usually None.
    """
    header = header or {}
    out_header: dict[str, Any] = {
        COMMAND: command,
        SERVER_VERSION: __version__,
        TIMESTAMP: timestamp(),
        OUTPUT: str(header.get(OUTPUT, OutputFormat.TEXT)),
        COMPRESSION: header.get(COMPRESSION, 0),
        ENCRYPTION: header.get(ENCRYPTION, 0),
    }
    if isinstance(header.get(CLIENT_VERSION), str):
        out_header[CLIENT_VERSION] = header[CLIENT_VERSION]
    outcome: dict[str, Any] = {
        STATUS: error is None,
        TIME: elapsed(time.monotonic() - started),
    }
    if error is not None:
        outcome[ERROR] = int(error.code)
        outcome[MESSAGE] = error.message
    return {HEADER: out_header, RESPONSE: dict(result or {}), OUTCOME: outcome}


def outcome_error(doc: dict[str, Any]) -> ManagementError | None:
    """The error an answer reports, None when it succeeded (for clients).

    An answer without a readable ``Outcome`` is itself an error
    (``BAD_DOCUMENT``); an error number this client does not know (a newer
    server) becomes ``COMMAND_FAILED`` with the number in the message.
    """
    outcome = doc.get(OUTCOME) if isinstance(doc, dict) else None
    if not isinstance(outcome, dict) or not isinstance(outcome.get(STATUS), bool):
        return ManagementError(ErrorCode.BAD_DOCUMENT, f"the answer has no {OUTCOME} status")
    if outcome[STATUS]:
        return None
    number = outcome.get(ERROR)
    message = outcome.get(MESSAGE)
    text = message if isinstance(message, str) and message.strip() else None
    if isinstance(number, int) and not isinstance(number, bool):
        try:
            code = ErrorCode(number)
        except ValueError:
            pass
        else:
            return ManagementError(code, text or code.name.lower().replace("_", " "))
    return ManagementError(
        ErrorCode.COMMAND_FAILED, f"error {number!r}: {text}" if text else f"error {number!r}"
    )

"""pgfleet's management protocol: ``pgfleet ctl`` talking to a running daemon.

pgmoneta's design (its architecture document, "Management"): every message,
both ways, is a frame of compression type, encryption type and length, then a
JSON document with a ``Header``, a ``Request`` and, in answers, a ``Response``
and an ``Outcome``.  Locally it runs over a Unix socket that only the owner
can open; remotely over TCP after a PostgreSQL-format handshake: optional
SSLRequest and TLS, a StartupMessage, then SCRAM-SHA-256 (with
``tls-server-end-point`` channel binding over TLS) against the admins file.

Modules, leaves first:

- :mod:`.document`: request and answer documents, error codes (no I/O).
- :mod:`.frame`: frames on a stream: compression, AES-256-GCM, size bounds.
- :mod:`.users`: the admins file of SCRAM verifiers (``pgfleet user``).
- :mod:`.auth`: the PostgreSQL-format handshake, server and client sides.

Invariants:

- A peer cannot crash the server or make it allocate much beyond the
  configured frame limit: every malformed input becomes a
  :class:`~.document.ManagementError` with a stable :class:`~.document.ErrorCode`.
- Passwords never reach a file or a log: the admins file holds SCRAM
  verifiers only, and proofs and keys are never logged.
- The numbering (compression, encryption) and key names are pgmoneta's, so
  the protocols can be read side by side; where pgfleet differs it says so.
"""

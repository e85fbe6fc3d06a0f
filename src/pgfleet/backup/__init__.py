"""Backups of the fleet: base backups, archived WAL, retention, verify and restore.

Layout on disk, under ``[backup] directory``, one tree per server::

    <directory>/<server>/
        .lock                         the catalog lock (flock): metadata changes, one at a time
        <name>.lock                   Catalog.exclusive(name): work there is one of (the receiver)
        backups/<ID>/                 one base backup; ID = its start, UTC, YYYYMMDDTHHMMSSZ
            backup.json               its metadata (catalog.BackupInfo), written last-and-atomically
            base.tar<suffix>          the data directory, as pg_basebackup -Ft streams it
            <oid>.tar<suffix>         one per tablespace
            pg_wal.tar<suffix>        the WAL the backup needs to be consistent
            backup_manifest<suffix>   PostgreSQL's manifest (SHA-256 checksums)
        wal/<segment><suffix>         archived WAL segments and timeline history files
        wal/incoming/                 pg_receivewal's working directory (its .partial)

``<suffix>`` names how a file is stored: ``.zst``, ``.lz4``, ``.gz``, ``.bz2``
or nothing, then ``.aes`` when encrypted.  Every stored file, whatever its
suffix, starts with a small header saying the same (store.py), so a reader
never trusts the name.

Invariants:

- A crash never leaves something that looks complete.  Every file is written
  under a temporary name (``.tmp-...``), fsynced, then renamed and its
  directory fsynced; a backup is VALID only once ``backup.json`` says so,
  which is written after all its files are in place.  A backup whose writer
  died stays IN_PROGRESS until ``Catalog.cleanup()`` finds its owner gone and
  marks it INVALID; a deletion interrupted half-way leaves DELETING, never
  VALID.  Ownership is an flock held by the live writer (on the backup's
  directory, on each temporary file), so no clock or pid guess is involved.
- Never whole files in memory: everything is streamed in chunks of at most
  1 MiB (compression, encryption, decompression with bounded output).
- Encrypted files are authenticated chunk by chunk before any byte of a chunk
  is returned: a flipped bit, a truncation, an appended or reordered chunk is
  an error naming the file and the chunk, never silently wrong data.
- Secrets are never logged nor stored: keys live in the key file only
  (``Codec`` does not print its key), and the errors recorded in
  ``backup.json`` have any ``password=...`` blanked.
"""

-- The backups of each server, for the web UI (issue 16).
--
-- A server's backups are in a catalog on the host of the collector that
-- takes them (src/pgfleet/backup/catalog.py); the web UI reads the
-- repository alone, and may run elsewhere.  So the collector copies each
-- server's catalog here: after every change it makes to it (a backup begun,
-- finished or failed, retention, cleanup, a deletion) and at every summary
-- (5 minutes), and `pgfleet backup create|delete|retain` do too when they
-- have a repository.  pgfleet.backups is that copy, never the truth: the
-- catalog is.  A server's rows go with the server (ON DELETE CASCADE).

CREATE TABLE pgfleet.backups (
    srvid integer NOT NULL REFERENCES pgfleet.servers ON DELETE CASCADE,
    backup_id text NOT NULL,
    -- No CHECK on kind and state: a newer collector's new state must not
    -- make the copy fail on a repository that does not know it yet.
    kind text NOT NULL,
    state text NOT NULL,
    parent text,  -- the backup an incremental one is taken against
    label text NOT NULL DEFAULT '',
    started timestamptz NOT NULL,
    finished timestamptz,
    start_lsn pg_lsn,
    end_lsn pg_lsn,
    timeline integer,
    start_wal text,  -- the WAL segments from start_lsn's to end_lsn's
    end_wal text,
    raw_bytes bigint NOT NULL DEFAULT 0,
    stored_bytes bigint NOT NULL DEFAULT 0,
    error text,  -- why it is invalid
    -- When the repository learned the row's current content.
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (srvid, backup_id)
);

-- Replace the rows of server _srvid by _backups, a JSON array of objects
-- with the columns above (but srvid and recorded_at), in one transaction.
-- Rows that did not change are left alone (and keep their recorded_at): the
-- collector sends every server's list at every summary.  Returns the rows
-- now held, or NULL when the server is gone (removed meanwhile: nothing to
-- copy).
CREATE FUNCTION pgfleet.backups_mirror(_srvid integer, _backups jsonb)
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    n integer;
BEGIN
    -- Held until commit against a concurrent removal, whose cascade would
    -- otherwise meet our inserts (a foreign key error) or miss them.
    PERFORM FROM pgfleet.servers WHERE srvid = _srvid FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    WITH listed AS MATERIALIZED (
        SELECT DISTINCT ON (b.backup_id)
               b.backup_id, b.kind, b.state, b.parent, coalesce(b.label, '') AS label,
               b.started, b.finished, b.start_lsn, b.end_lsn, b.timeline, b.start_wal,
               b.end_wal, coalesce(b.raw_bytes, 0) AS raw_bytes,
               coalesce(b.stored_bytes, 0) AS stored_bytes, b.error
          FROM jsonb_to_recordset(coalesce(_backups, '[]')) AS b(
                   backup_id text, kind text, state text, parent text, label text,
                   started timestamptz, finished timestamptz, start_lsn pg_lsn,
                   end_lsn pg_lsn, timeline integer, start_wal text, end_wal text,
                   raw_bytes bigint, stored_bytes bigint, error text)
         ORDER BY b.backup_id),
    -- The rows the catalog no longer has: disjoint from those upserted
    -- below, so one statement may do both.
    gone AS (
        DELETE FROM pgfleet.backups o
         WHERE o.srvid = _srvid
           AND NOT EXISTS (SELECT FROM listed n WHERE n.backup_id = o.backup_id))
    INSERT INTO pgfleet.backups AS o
        (srvid, backup_id, kind, state, parent, label, started, finished, start_lsn, end_lsn,
         timeline, start_wal, end_wal, raw_bytes, stored_bytes, error)
    SELECT _srvid, n.backup_id, n.kind, n.state, n.parent, n.label, n.started, n.finished,
           n.start_lsn, n.end_lsn, n.timeline, n.start_wal, n.end_wal, n.raw_bytes,
           n.stored_bytes, n.error
      FROM listed n
    ON CONFLICT (srvid, backup_id) DO UPDATE
       SET kind = EXCLUDED.kind, state = EXCLUDED.state, parent = EXCLUDED.parent,
           label = EXCLUDED.label, started = EXCLUDED.started, finished = EXCLUDED.finished,
           start_lsn = EXCLUDED.start_lsn, end_lsn = EXCLUDED.end_lsn,
           timeline = EXCLUDED.timeline, start_wal = EXCLUDED.start_wal,
           end_wal = EXCLUDED.end_wal, raw_bytes = EXCLUDED.raw_bytes,
           stored_bytes = EXCLUDED.stored_bytes, error = EXCLUDED.error,
           recorded_at = now()
     WHERE (o.kind, o.state, o.parent, o.label, o.started, o.finished, o.start_lsn,
            o.end_lsn, o.timeline, o.start_wal, o.end_wal, o.raw_bytes, o.stored_bytes,
            o.error)
           IS DISTINCT FROM
           (EXCLUDED.kind, EXCLUDED.state, EXCLUDED.parent, EXCLUDED.label,
            EXCLUDED.started, EXCLUDED.finished, EXCLUDED.start_lsn, EXCLUDED.end_lsn,
            EXCLUDED.timeline, EXCLUDED.start_wal, EXCLUDED.end_wal, EXCLUDED.raw_bytes,
            EXCLUDED.stored_bytes, EXCLUDED.error);
    SELECT count(*) INTO n FROM pgfleet.backups WHERE srvid = _srvid;
    RETURN n;
END;
$fn$;

-- The web UI's readers (0004's default privileges cover tables made by the
-- role that ran 0004; this one may have been made by another).
DO $fn$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgfleet_read') THEN
        GRANT SELECT ON pgfleet.backups TO pgfleet_read;
    END IF;
END;
$fn$;

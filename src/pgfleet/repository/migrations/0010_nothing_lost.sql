-- Nothing lost when the repository or a collector fails.
--
-- 1. A repository in trouble keeps the snapshot whole.  run_operation used to
--    record any failure of a source's snapshot function and go on, so a
--    repository out of disk, read-only, shutting down or with a grant taken
--    away stored snapshots without the sources it refused.  Those errors are
--    now raised: the whole snapshot fails, and the collector keeps it in its
--    spool until the repository takes it (see collector/writer.py).  Only the
--    snapshot operation: a failed aggregate or purge loses nothing (the rows
--    wait in <module>_current for the next one), and a role that may store
--    but not create partitions must not stop every snapshot.
--
-- 2. Lease terms.  Each grant of a lease is a term (pgfleet.lease_terms), kept
--    while its owner renews it, ended when another collector takes the lease.
--    The collector stamps each snapshot with its term and when it was taken
--    (by the repository's clock, as it estimates it), and the fence
--    (lease_fence) lets a snapshot in if it was taken under its collector's
--    term -- the current one, or one another collector took since, provided
--    the snapshot was taken before that and the new owner stored nothing
--    yet.  The new owner waits (spools) while an earlier owner may still
--    drain what it took: a server's snapshots reach the repository in the
--    order they were taken, whoever took them.  See docs/collector.md, "When
--    the repository fails".
--
-- 3. After a repository outage, nobody takes anybody's leases at once:
--    lease_round sees that no collector was heard of for a whole period and
--    gives those alive when it went quiet time to come back.
--
-- 4. A snapshot is stored once, however often it is sent: its key is claimed
--    in the store's transaction (snapshot_claim), so a spooled copy of a
--    snapshot whose COMMIT went through after the collector gave up waiting
--    is recognised and not stored again.
--
-- 5. Purges also run on time (take_snapshot's _purge_interval), and a
--    monitored server's clock off by more than a minute is brought back to
--    the repository's in the snapshot's transaction (snapshot_clamp).

-- Every function here runs with search_path = pg_catalog, pg_temp, as 0009
-- made them all; so does this script, whatever the migrating session's path
-- (restored at the end).
SELECT pg_catalog.set_config('pgfleet.migrating_search_path',
                             pg_catalog.current_setting('search_path'), true),
       pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

-- 1. ------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgfleet.run_operation(_srvid integer, _operation text, _modules text[] DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    failures integer := 0;
BEGIN
    FOR r IN
        SELECT module, function_name FROM pgfleet.functions
         WHERE operation = _operation AND enabled
           AND (_modules IS NULL OR module = ANY (_modules))
         ORDER BY priority, module
    LOOP
        BEGIN
            EXECUTE format('SELECT %s($1)', r.function_name::regproc) USING _srvid;
        EXCEPTION WHEN OTHERS THEN
            -- The repository's trouble, not the source's: connection (08),
            -- read-only (25), conflict (40), resources (53: disk full, out of
            -- memory), object state (55: lock not available), shutdown (57),
            -- system (58), corruption (XX001, XX002), a privilege taken away
            -- (42501).  Stored without this source, the snapshot would be
            -- lost for it; failed whole, it is kept and stored later.
            IF _operation = 'snapshot'
               AND (left(SQLSTATE, 2) IN ('08', '25', '40', '53', '55', '57', '58')
                    OR SQLSTATE IN ('42501', 'XX001', 'XX002')) THEN
                RAISE;
            END IF;
            failures := failures + 1;
            PERFORM pgfleet.record_error(_srvid, r.module,
                                         format('%s failed: %s', _operation, SQLERRM), 'store');
        END;
    END LOOP;
    RETURN failures;
END;
$$;

-- 2. ------------------------------------------------------------------------

-- One row per grant of a lease.  ended_at: when another collector took it,
-- or its owner let it go.  Until closed, its owner may still store the
-- snapshots it took before ended_at; the next owners wait for that until
-- drain_until, which the old owner's lease rounds push back while it has
-- snapshots of the server to store.  Closed: nothing more is stored under it
-- (a later term stored, its owner drained, or the window passed).
CREATE TABLE pgfleet.lease_terms (
    term bigserial PRIMARY KEY,
    srvid integer NOT NULL REFERENCES pgfleet.servers ON DELETE CASCADE,
    owner text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    drain_until timestamptz,
    closed boolean NOT NULL DEFAULT false
);
CREATE INDEX ON pgfleet.lease_terms (srvid) WHERE NOT closed;

ALTER TABLE pgfleet.collector_leases ADD COLUMN term bigint;
WITH t AS (
    INSERT INTO pgfleet.lease_terms (srvid, owner, started_at)
    SELECT srvid, owner, acquired_at FROM pgfleet.collector_leases
    RETURNING term, srvid
)
UPDATE pgfleet.collector_leases l SET term = t.term FROM t WHERE l.srvid = t.srvid;
ALTER TABLE pgfleet.collector_leases ALTER COLUMN term SET NOT NULL;

DROP FUNCTION pgfleet.lease_round(text, text, integer, interval, integer[]);

-- One lease round of collector _owner, which sees the servers _srvids and
-- has snapshots of _pending waiting in its spool: heartbeat, let go of
-- servers it no longer sees, renew the rest, keep open (or close) the terms
-- others took from it, then take free or expired leases up to its fair share
-- (the fleet divided by the live collectors, rounded up).  It does not give
-- up leases above its share: the collector first stops those servers'
-- snapshots, then calls lease_release.  Returns what it holds afterwards,
-- each lease's term, and the repository's clock (for the collector's
-- estimate of it).
--
-- _grace: how long the collectors alive when the repository went quiet get
-- to come back after it (default: one period).  If no collector at all was
-- heard of for a whole period, the repository was out of everyone's reach
-- (down, read-only, full) rather than one collector out of its: the first
-- one back must not count the others dead and take their leases, which
-- would leave them their whole outage to hand over.
CREATE FUNCTION pgfleet.lease_round(
    _owner text, _host text, _pid integer, _period interval, _srvids integer[],
    _pending integer[] DEFAULT '{}', _grace interval DEFAULT NULL)
RETURNS TABLE (owned integer[], terms bigint[], share integer, collectors integer,
               clock double precision)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    _have integer;
    _last timestamptz;
    _took integer[];
    _took_terms bigint[];
BEGIN
    SELECT max(c.heartbeat) INTO _last FROM pgfleet.collectors c;
    IF _last < now() - _period THEN
        UPDATE pgfleet.collectors c SET expires_at = now() + coalesce(_grace, _period)
         WHERE c.expires_at >= _last AND c.expires_at < now() + coalesce(_grace, _period);
        UPDATE pgfleet.collector_leases l SET expires_at = now() + coalesce(_grace, _period)
         WHERE l.expires_at >= _last AND l.expires_at < now() + coalesce(_grace, _period);
    END IF;

    INSERT INTO pgfleet.collectors AS c (name, host, pid, expires_at)
    VALUES (_owner, _host, _pid, now() + _period)
    ON CONFLICT (name) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, heartbeat = now(),
           expires_at = excluded.expires_at,
           started_at = CASE WHEN c.pid = excluded.pid THEN c.started_at ELSE now() END;
    DELETE FROM pgfleet.collectors c WHERE c.expires_at < now() - 10 * _period;

    -- Servers we no longer see (they left our fleet): nothing of theirs is
    -- left to store, the daemon drops their spooled snapshots.
    WITH gone AS (
        DELETE FROM pgfleet.collector_leases l
         WHERE l.owner = _owner AND NOT (l.srvid = ANY (_srvids))
        RETURNING l.term
    )
    UPDATE pgfleet.lease_terms t SET ended_at = now(), closed = true
      FROM gone WHERE t.term = gone.term;
    UPDATE pgfleet.collector_leases l SET expires_at = now() + _period WHERE l.owner = _owner;

    -- Terms others took from us: still open while we have snapshots of the
    -- server to store, closed once we have none.
    UPDATE pgfleet.lease_terms t SET closed = true
     WHERE t.owner = _owner AND t.ended_at IS NOT NULL AND NOT t.closed
       AND NOT (t.srvid = ANY (_pending));
    UPDATE pgfleet.lease_terms t SET drain_until = greatest(t.drain_until, now() + _period)
     WHERE t.owner = _owner AND t.ended_at IS NOT NULL AND NOT t.closed;
    -- Closed terms are kept a while, for the log of who collected what.
    DELETE FROM pgfleet.lease_terms t WHERE t.closed AND t.ended_at < now() - 10 * _period;

    SELECT count(*) INTO collectors FROM pgfleet.collectors c WHERE c.expires_at > now();
    share := ceil(cardinality(_srvids)::numeric / greatest(collectors, 1));
    SELECT count(*) INTO _have FROM pgfleet.collector_leases l WHERE l.owner = _owner;
    IF _have < share THEN
        -- Each collector prefers different servers (the hash includes its
        -- name), so that collectors starting together rarely contend.  The
        -- WHERE of ON CONFLICT is rechecked on the latest row version: of
        -- two collectors racing for one lease, one gets it.
        WITH taken AS (
            INSERT INTO pgfleet.collector_leases AS l (srvid, owner, expires_at, term)
            SELECT s.srvid, _owner, now() + _period, nextval('pgfleet.lease_terms_term_seq')
              FROM unnest(_srvids) AS s(srvid)
             WHERE EXISTS (SELECT 1 FROM pgfleet.servers v WHERE v.srvid = s.srvid)
               AND NOT EXISTS (SELECT 1 FROM pgfleet.collector_leases o
                                WHERE o.srvid = s.srvid AND o.expires_at >= now())
             ORDER BY hashtext(_owner || ':' || s.srvid)
             LIMIT share - _have
            ON CONFLICT (srvid) DO UPDATE
               SET owner = excluded.owner, expires_at = excluded.expires_at, acquired_at = now(),
                   term = excluded.term
             WHERE l.expires_at < now()
            RETURNING l.srvid, l.term
        )
        SELECT array_agg(taken.srvid), array_agg(taken.term) INTO _took, _took_terms FROM taken;
        IF _took IS NOT NULL THEN
            -- The terms we took over end now; their owners get a period to
            -- come back and store what they took under them (see above).
            UPDATE pgfleet.lease_terms t SET ended_at = now(), drain_until = now() + _period
             WHERE t.srvid = ANY (_took) AND t.ended_at IS NULL;
            INSERT INTO pgfleet.lease_terms (term, srvid, owner)
            SELECT x.term, x.srvid, _owner FROM unnest(_took_terms, _took) AS x(term, srvid);
        END IF;
    END IF;
    SELECT array_agg(l.srvid ORDER BY l.srvid), array_agg(l.term ORDER BY l.srvid)
      INTO owned, terms
      FROM pgfleet.collector_leases l WHERE l.owner = _owner;
    owned := coalesce(owned, '{}');
    terms := coalesce(terms, '{}');
    clock := extract(epoch FROM now());
    RETURN NEXT;
END;
$$;

-- The fence of every store, in its transaction: may _owner store a snapshot
-- of _srvid it took under _term, by the repository's clock before _taken?
--   'ok'       _term is _owner's current term (or _term is NULL and the
--              lease is _owner's);
--   'handover' _term was _owner's, another collector took the lease after
--              _taken, and stored nothing yet;
--   'wait'     not now: an earlier owner may still store what it took before
--              (the collector keeps the snapshot and tries again);
--   'lost'     never: taken after another collector took the lease, or that
--              one has stored since.
-- Locks the lease row (a takeover waits for the store to end) and the open
-- earlier terms (their owners' stores and ours go one after the other).  The
-- first store under a term closes every earlier one: an older snapshot
-- cannot go in after a newer one.
CREATE FUNCTION pgfleet.lease_fence(_srvid integer, _owner text, _term bigint, _taken timestamptz)
RETURNS text LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    l record;
    t record;
    _current bigint;
BEGIN
    SELECT o.owner, o.term INTO l FROM pgfleet.collector_leases o WHERE o.srvid = _srvid FOR SHARE;
    IF FOUND AND l.owner = _owner AND (_term IS NULL OR l.term = _term) THEN
        _current := l.term;
    ELSE
        SELECT * INTO t FROM pgfleet.lease_terms o
         WHERE o.term = _term AND o.srvid = _srvid AND o.owner = _owner FOR UPDATE;
        IF NOT FOUND OR t.closed OR t.ended_at IS NULL OR _taken IS NULL
           OR _taken >= t.ended_at THEN
            RETURN 'lost';
        END IF;
    END IF;
    -- Earlier terms of other collectors, still open: what they took comes
    -- first.  (Our own come first in our spool already.)
    PERFORM 1 FROM pgfleet.lease_terms o
      WHERE o.srvid = _srvid AND o.term < coalesce(_current, _term) AND NOT o.closed
        AND o.owner <> _owner AND o.drain_until > now()
        FOR UPDATE;
    IF FOUND THEN
        RETURN 'wait';
    END IF;
    UPDATE pgfleet.lease_terms o SET closed = true
     WHERE o.srvid = _srvid AND o.term < coalesce(_current, _term) AND NOT o.closed;
    RETURN CASE WHEN _current IS NULL THEN 'handover' ELSE 'ok' END;
END;
$$;

-- A collector has stored (or dropped) everything it took under _term, a term
-- another collector took from it: the new owner need not wait any longer.
CREATE FUNCTION pgfleet.lease_drained(_srvid integer, _owner text, _term bigint)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    UPDATE pgfleet.lease_terms SET closed = true
     WHERE term = _term AND srvid = _srvid AND owner = _owner AND ended_at IS NOT NULL;
$$;

-- Leases let go of (above the fair share, or servers that left the fleet)
-- have nothing left to store: the collector releases only those.
CREATE OR REPLACE FUNCTION pgfleet.lease_release(_owner text, _srvids integer[])
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM pgfleet.collector_leases
         WHERE owner = _owner AND srvid = ANY (_srvids)
        RETURNING term
    )
    UPDATE pgfleet.lease_terms t SET ended_at = now(), closed = true
      FROM gone WHERE t.term = gone.term;
$$;

-- A collector stopping cleanly: its leases go at once (others take its
-- servers at their next round), except those it keeps for the snapshots it
-- still has spooled, which it may store after a restart -- or, if another
-- collector took them meanwhile, during the handover (see lease_fence).
CREATE OR REPLACE FUNCTION pgfleet.collector_leave(_owner text, _keep integer[])
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM pgfleet.collector_leases
         WHERE owner = _owner AND NOT (srvid = ANY (_keep))
        RETURNING term
    )
    UPDATE pgfleet.lease_terms t SET ended_at = now(), closed = true
      FROM gone WHERE t.term = gone.term;
    DELETE FROM pgfleet.collectors WHERE name = _owner;
$$;

CREATE OR REPLACE FUNCTION pgfleet.grant_admin() RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF to_regrole('pgfleet_admin') IS NULL THEN
        RETURN;
    END IF;
    GRANT USAGE ON SCHEMA pgfleet TO pgfleet_admin;
    GRANT SELECT ON pgfleet.schema_migrations, pgfleet.servers, pgfleet.collectors,
                    pgfleet.collector_leases, pgfleet.lease_terms,
                    pgfleet.collector_replies TO pgfleet_admin;
    GRANT INSERT (channel, payload) ON pgfleet.collector_requests TO pgfleet_admin;
    GRANT USAGE ON SEQUENCE pgfleet.collector_requests_id_seq TO pgfleet_admin;
END;
$$;
SELECT pgfleet.grant_admin();

-- 4. ------------------------------------------------------------------------

-- The key of the server's last stored snapshot.  A server's snapshots are
-- stored in order, one at a time: a snapshot sent again (its store timed out
-- on the collector's side but committed) can only be the last one stored.
ALTER TABLE pgfleet.snapshot_state ADD COLUMN last_key uuid;

-- Claim _key as the server's last stored snapshot, in the store's
-- transaction; raise 'PF001' (the collector's "stored already") if it is.
-- The row lock makes a store of the same snapshot still in flight (the one
-- given up on) end first, and the check see its outcome.
CREATE FUNCTION pgfleet.snapshot_claim(_srvid integer, _key uuid)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO pgfleet.snapshot_state AS st (srvid, last_key) VALUES (_srvid, _key)
    ON CONFLICT (srvid) DO UPDATE SET last_key = excluded.last_key
     WHERE st.last_key IS DISTINCT FROM excluded.last_key;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'snapshot % of server % is stored already', _key, _srvid
              USING ERRCODE = 'PF001';
    END IF;
END;
$$;

-- 5. ------------------------------------------------------------------------

-- A monitored server's clock off: its rows' timestamps, as staged in the
-- transient tables of the modules _sources (their query_source), moved to
-- the repository's clock.  _start and _end: when the snapshot was taken, by
-- the repository's clock as the collector estimates it.  Only if the first
-- row's ts is more than _threshold out of that range; each transient table
-- with a ts column is then shifted by the same amount (the snapshot's rows
-- keep their order).  Costs one row read otherwise.  Returns the shift in
-- seconds (0: none).  Without it, a server behind by more than its retention
-- would have every snapshot purged as soon as stored, and one ahead would
-- show its data in the future.
CREATE FUNCTION pgfleet.snapshot_clamp(_sources text[], _start timestamptz, _end timestamptz,
                                       _threshold interval DEFAULT '60 s')
RETURNS double precision LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    _tmps regclass[];
    _ts timestamptz;
    _shift interval;
    t regclass;
BEGIN
    SELECT array_agg(x.tmp ORDER BY x.o) INTO _tmps
      FROM (SELECT to_regclass(s || '_tmp') AS tmp, o
              FROM unnest(_sources) WITH ORDINALITY AS u(s, o)) x
     WHERE EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = x.tmp AND a.attname = 'ts' AND NOT a.attisdropped
                      AND a.atttypid = 'timestamptz'::regtype);
    IF _tmps IS NULL OR _start IS NULL OR _end IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT ts FROM %s LIMIT 1', _tmps[1]) INTO _ts;
    IF _ts IS NULL OR _ts BETWEEN _start - _threshold AND _end + _threshold THEN
        RETURN 0;
    END IF;
    _shift := _start - _ts;
    FOREACH t IN ARRAY _tmps LOOP
        EXECUTE format('UPDATE %s SET ts = ts + $1', t) USING _shift;
    END LOOP;
    RETURN extract(epoch FROM _shift);
END;
$$;

DROP FUNCTION pgfleet.take_snapshot(integer, text[]);

-- Aggregates every coalesce snapshots; purges every 10th aggregate and also
-- whenever the last purge is _purge_interval old: a server snapshotted once
-- an hour aggregates every 100 hours, and purged every 10th aggregate only,
-- it would keep its data 41 days past its retention.  A server that never
-- purged starts at a stable point of the interval, so that a fleet added at
-- once does not purge at once.
CREATE FUNCTION pgfleet.take_snapshot(_srvid integer, _modules text[] DEFAULT NULL,
                                      _purge_interval interval DEFAULT '1 day')
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    failures integer;
    st pgfleet.snapshot_state;
    srv pgfleet.servers;
    _purge boolean := false;
BEGIN
    PERFORM pgfleet.snapshot_lock();
    SELECT * INTO srv FROM pgfleet.servers WHERE srvid = _srvid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no server with srvid %', _srvid;
    END IF;
    INSERT INTO pgfleet.snapshot_state (srvid) VALUES (_srvid) ON CONFLICT DO NOTHING;

    failures := pgfleet.run_operation(_srvid, 'snapshot', _modules);

    UPDATE pgfleet.snapshot_state
       SET snapshots = snapshots + 1, coalesce_seq = coalesce_seq + 1, last_snapshot = now(),
           last_purge = coalesce(last_purge,
                                 now() - _purge_interval * ((hashtext('purge:' || _srvid) & 1023) / 1024.0)::float8)
     WHERE srvid = _srvid
    RETURNING * INTO st;

    IF st.coalesce_seq >= srv.coalesce THEN
        failures := failures + pgfleet.run_operation(_srvid, 'aggregate');
        UPDATE pgfleet.snapshot_state
           SET coalesce_seq = 0, aggregates = aggregates + 1, last_aggregate = now()
         WHERE srvid = _srvid
        RETURNING * INTO st;
        _purge := st.aggregates % 10 = 0;
    END IF;
    IF _purge OR st.last_purge < now() - _purge_interval THEN
        failures := failures + pgfleet.run_operation(_srvid, 'purge');
        UPDATE pgfleet.snapshot_state SET last_purge = now() WHERE srvid = _srvid;
    END IF;
    RETURN failures;
END;
$$;

SELECT pg_catalog.set_config('search_path',
                             pg_catalog.current_setting('pgfleet.migrating_search_path'), true);

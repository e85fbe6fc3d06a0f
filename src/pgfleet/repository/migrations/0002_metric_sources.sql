-- The generic storage behind every built-in datasource (and any user source
-- that wants it).  A source's transient table pgfleet.<module>_src_tmp
-- declares the column types; metric_sources says what each column is:
--
--   keys      identify an entry (a database, a statement...)
--   counters  cumulative; stored as a reset-safe delta since the previous
--             snapshot, so a rate over any range is sum(delta) / duration
--             (a NULL delta is zero, or unknown on a server's first snapshot)
--   deltas    already per-snapshot values; stored as they come
--   gauges    current values; stored only when they changed
--   onces     fixed per entry (a query text); stored once per key
--   epoch     a column whose change means the counters restarted
--
-- Per source it creates:
--   <module>_last     the latest cumulative values per key (the delta base)
--   <module>_current  one row per changed entry per snapshot, until aggregated
--   <module>_history  aggregated rows: one per key and aggregation window,
--                     its points as one array of <module>_point composites
--                     (TOAST-compressed even when small), partitioned by day
--                     so retention drops whole partitions
--   <module>_once     the once-columns per key
-- An entry that did not change between two snapshots writes nothing at all.

CREATE TABLE pgfleet.metric_sources (
    module text PRIMARY KEY,
    src_function text NOT NULL,
    keys text[] NOT NULL DEFAULT '{}',
    counters text[] NOT NULL DEFAULT '{}',
    deltas text[] NOT NULL DEFAULT '{}',
    gauges text[] NOT NULL DEFAULT '{}',
    onces text[] NOT NULL DEFAULT '{}',
    epoch text,
    scope text CHECK (scope IS NULL OR scope = ANY (keys))
);

-- Per server and source: when it was first snapshotted.  No row means the
-- next snapshot is the first, whose counters have no delta base.
CREATE TABLE pgfleet.metric_state (
    srvid integer NOT NULL,
    module text NOT NULL REFERENCES pgfleet.metric_sources ON DELETE CASCADE,
    first_ts timestamptz NOT NULL,
    PRIMARY KEY (srvid, module)
);

-- "p.a, p.b" from {a,b}; "" for an empty list.
CREATE FUNCTION pgfleet._list(_cols text[], _fmt text DEFAULT '%I', _sep text DEFAULT ', ')
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(string_agg(format(_fmt, c), _sep ORDER BY o), '')
      FROM unnest(_cols) WITH ORDINALITY AS u(c, o);
$$;

-- Column definitions ("name type") of the transient table, for the given columns.
CREATE FUNCTION pgfleet._coldefs(_tmp regclass, _cols text[], _array boolean DEFAULT false)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(string_agg(format('%I %s%s', c,
                                      format_type(a.atttypid, a.atttypmod),
                                      CASE WHEN _array THEN '[]' ELSE '' END), ', ' ORDER BY o), '')
      FROM unnest(_cols) WITH ORDINALITY AS u(c, o)
      JOIN pg_attribute a ON a.attrelid = _tmp AND a.attname = c AND NOT a.attisdropped;
$$;

CREATE FUNCTION pgfleet._tmp_table(_module text) RETURNS regclass LANGUAGE sql STABLE AS $$
    SELECT (src_function || '_tmp')::regclass FROM pgfleet.metric_sources WHERE module = _module;
$$;

-- Create (or complete, after columns were added) the storage of a source and
-- register its operations.  Idempotent: existing tables only gain columns.
CREATE FUNCTION pgfleet.create_metric_source(
    _module text, _src_function text,
    _keys text[], _counters text[], _deltas text[], _gauges text[], _onces text[],
    _epoch text DEFAULT NULL, _scope text DEFAULT NULL,
    _priority integer DEFAULT 10, _query_cleanup text DEFAULT NULL,
    _added_manually boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql AS $body$
DECLARE
    tmp regclass := (_src_function || '_tmp')::regclass;
    base text := 'pgfleet.' || quote_ident(_module);
    values_ text[] := _counters || _deltas || _gauges;
    missing text;
    c text;
    typ text;
BEGIN
    IF _module !~ '^[a-z_][a-z0-9_]*$' OR length(_module) > 40 THEN
        RAISE EXCEPTION 'invalid module name "%": use lower case letters, digits and _ (40 at most)', _module;
    END IF;
    SELECT string_agg(x, ', ') INTO missing
      FROM unnest(_keys || values_ || _onces || coalesce(_epoch, 'ts') || 'ts'::text) x
     WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = tmp AND attname = x AND NOT attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'transient table % has no column(s) %', tmp, missing;
    END IF;

    INSERT INTO pgfleet.metric_sources
    VALUES (_module, _src_function, _keys, _counters, _deltas, _gauges, _onces, _epoch, _scope)
    ON CONFLICT (module) DO UPDATE
       SET src_function = excluded.src_function, keys = excluded.keys,
           counters = excluded.counters, deltas = excluded.deltas, gauges = excluded.gauges,
           onces = excluded.onces, epoch = excluded.epoch, scope = excluded.scope;

    -- The delta base is rewritten on every change of an entry: leave room on
    -- each page so those updates stay HOT (no new index entries, no bloat).
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s_last (srvid integer NOT NULL, ts timestamptz NOT NULL%s%s, PRIMARY KEY (srvid%s)) WITH (fillfactor = 50)',
                   base,
                   CASE WHEN _keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, _keys) END,
                   CASE WHEN _epoch IS NULL THEN '' ELSE ', ' || pgfleet._coldefs(tmp, ARRAY[_epoch]) END,
                   pgfleet._list(_keys, ', %I', ''));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s_current (srvid integer NOT NULL, ts timestamptz NOT NULL%s)',
                   base, CASE WHEN _keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, _keys) END);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s_current (srvid, ts)', _module || '_current_srvid_ts', base);
    -- One array of composite points per history row rather than one array
    -- per column: a window in which an entry changed once or twice would
    -- otherwise pay an array header per column, which costs more than the
    -- values themselves.
    IF to_regtype(base || '_point') IS NULL THEN
        EXECUTE format('CREATE TYPE %s_point AS (ts timestamptz)', base);
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %1$s_history (srvid integer NOT NULL%2$s, ts_start timestamptz NOT NULL, ts_end timestamptz NOT NULL, points %1$s_point[] NOT NULL) PARTITION BY RANGE (ts_start)',
                   base, CASE WHEN _keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, _keys) END);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s_history (srvid%s, ts_start)',
                   _module || '_history_key', base, pgfleet._list(_keys, ', %I', ''));

    -- Value columns, added one by one so a source gaining a column later
    -- upgrades in place.
    FOREACH c IN ARRAY values_ LOOP
        SELECT format_type(atttypid, atttypmod) INTO typ FROM pg_attribute
         WHERE attrelid = tmp AND attname = c;
        EXECUTE format('ALTER TABLE %s_last ADD COLUMN IF NOT EXISTS %I %s', base, c, typ);
        EXECUTE format('ALTER TABLE %s_current ADD COLUMN IF NOT EXISTS %I %s', base, c, typ);
        IF NOT EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = (SELECT typrelid FROM pg_type WHERE oid = to_regtype(base || '_point'))
                          AND attname = c AND NOT attisdropped) THEN
            EXECUTE format('ALTER TYPE %s_point ADD ATTRIBUTE %I %s', base, c, typ);
        END IF;
    END LOOP;

    IF _onces <> '{}' THEN
        EXECUTE format('CREATE TABLE IF NOT EXISTS %s_once (srvid integer NOT NULL%s, first_seen timestamptz NOT NULL, PRIMARY KEY (srvid%s))',
                       base, CASE WHEN _keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, _keys) END,
                       pgfleet._list(_keys, ', %I', ''));
        FOREACH c IN ARRAY _onces LOOP
            SELECT format_type(atttypid, atttypmod) INTO typ FROM pg_attribute
             WHERE attrelid = tmp AND attname = c;
            EXECUTE format('ALTER TABLE %s_once ADD COLUMN IF NOT EXISTS %I %s', base, c, typ);
        END LOOP;
    END IF;

    -- The four registered operations are thin wrappers over the generic ones,
    -- so a user can see (and replace) them like any other source's.
    EXECUTE format('CREATE OR REPLACE FUNCTION %s_snapshot(_srvid integer) RETURNS void LANGUAGE plpgsql AS %L',
                   base, pgfleet.metric_snapshot_body(_module));
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s_aggregate(_srvid integer) RETURNS void
                      LANGUAGE sql AS $w$SELECT pgfleet.metric_aggregate(%L, _srvid)$w$$f$, base, _module);
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s_purge(_srvid integer) RETURNS void
                      LANGUAGE sql AS $w$SELECT pgfleet.metric_purge(%L, _srvid)$w$$f$, base, _module);
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s_unregister(_srvid integer) RETURNS boolean
                      LANGUAGE sql AS $w$DELETE FROM pgfleet.functions WHERE module = %L; SELECT true$w$$f$,
                   base, _module);

    -- A series reader: every stored point of one server in a time range,
    -- history and not-yet-aggregated rows alike.  It is a plain SQL function
    -- so the planner inlines it and pushes key filters into the index scans.
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$s_series(_srvid integer, _from timestamptz, _to timestamptz)
                      RETURNS TABLE (ts timestamptz%2$s%3$s)
                      LANGUAGE sql STABLE AS $s$
                        SELECT p.ts%4$s%5$s
                          FROM %1$s_history h, unnest(h.points) AS p
                         WHERE h.srvid = _srvid AND h.ts_start <= _to AND h.ts_end >= _from
                           AND p.ts >= _from AND p.ts <= _to
                        UNION ALL
                        SELECT c.ts%6$s%7$s FROM %1$s_current c
                         WHERE c.srvid = _srvid AND c.ts >= _from AND c.ts <= _to
                      $s$$f$,
                   base,
                   CASE WHEN _keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, _keys) END,
                   CASE WHEN values_ = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, values_) END,
                   pgfleet._list(_keys, ', h.%I', ''), pgfleet._list(values_, ', p.%I', ''),
                   pgfleet._list(_keys, ', c.%I', ''), pgfleet._list(values_, ', c.%I', ''));

    INSERT INTO pgfleet.functions AS f
           (module, operation, function_name, query_source, query_cleanup, added_manually, priority)
    VALUES (_module, 'snapshot', base || '_snapshot', _src_function, _query_cleanup, _added_manually, _priority),
           (_module, 'aggregate', base || '_aggregate', NULL, NULL, _added_manually, _priority),
           (_module, 'purge', base || '_purge', NULL, NULL, _added_manually, _priority),
           (_module, 'unregister', base || '_unregister', NULL, NULL, _added_manually, _priority)
    ON CONFLICT (module, operation) DO UPDATE
       -- "enabled" is the user's choice and survives re-registration.
       SET function_name = excluded.function_name, query_source = excluded.query_source,
           query_cleanup = excluded.query_cleanup, added_manually = excluded.added_manually,
           priority = excluded.priority;
END;
$body$;

-- The body of a source's snapshot function, generated once per source (at
-- registration) rather than per call: the statement is static, so PL/pgSQL
-- caches its plan and a snapshot costs what the data costs, not parsing and
-- planning a dozen dynamic statements.
CREATE FUNCTION pgfleet.metric_snapshot_body(_module text)
RETURNS text LANGUAGE plpgsql AS $body$
DECLARE
    m pgfleet.metric_sources;
    base text;
    keyjoin text;
    changed text;
    reset text;
    tracked text[];
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    base := 'pgfleet.' || quote_ident(_module);
    tracked := m.counters || m.gauges;

    keyjoin := CASE WHEN m.keys = '{}' THEN 'true'
                    ELSE pgfleet._list(m.keys, 'p.%1$I = s.%1$I', ' AND ') END;
    -- Counters restarted when the epoch moved or any counter went backwards.
    reset := concat_ws(' OR ',
                       CASE WHEN m.epoch IS NOT NULL THEN format('p.%1$I IS DISTINCT FROM s.%1$I', m.epoch) END,
                       nullif(pgfleet._list(m.counters, 's.%1$I < p.%1$I', ' OR '), ''));
    IF reset = '' THEN reset := 'false'; END IF;
    -- An entry changed if it is new, any tracked value differs from the
    -- delta base (one row comparison, NULL-safe), or a delta is not zero.
    changed := concat_ws(' OR ', 'p.srvid IS NULL',
        CASE WHEN tracked <> '{}' THEN
            format('ROW(%s) IS DISTINCT FROM ROW(%s)',
                   pgfleet._list(tracked, 's.%I'), pgfleet._list(tracked, 'p.%I')) END,
        nullif(pgfleet._list(m.deltas, 'coalesce(s.%1$I <> 0, false)', ' OR '), ''));

    -- One statement: read the staged rows once, compare them with the delta
    -- base, then for the entries that changed only: write a row, move the
    -- base forward, remember the once-columns of new entries; and forget
    -- (with a tombstone row when there are gauges) the entries that
    -- vanished.  The parts touch disjoint rows.  j is materialised so its
    -- flags are computed once per row, not once per column that uses them.
    RETURN format($f$
DECLARE
    _first boolean := NOT EXISTS (SELECT 1 FROM pgfleet.metric_state
                                   WHERE srvid = _srvid AND module = %1$L);
BEGIN
    WITH s AS MATERIALIZED (SELECT * FROM %2$s(_srvid)),
    j AS MATERIALIZED (
        SELECT s.*, (p.srvid IS NOT NULL) AS known__,
               (p.srvid IS NOT NULL AND (%3$s)) AS reset__ %4$s
          FROM s LEFT JOIN %5$s_last p ON p.srvid = _srvid AND %6$s
         WHERE %7$s
    ),
    d AS (
        SELECT j.ts, j.known__ %8$s %9$s %10$s
          FROM j
    ),
    ins AS (
        INSERT INTO %5$s_current (srvid, ts %11$s %12$s)
        SELECT _srvid, d.ts %13$s %14$s FROM d
    ),
    upd AS (
        UPDATE %5$s_last p SET ts = d.ts %15$s
          FROM d WHERE d.known__ AND p.srvid = _srvid %16$s
    ),
    new AS (
        INSERT INTO %5$s_last (srvid, ts %11$s %17$s)
        SELECT _srvid, d.ts %13$s %18$s FROM d WHERE NOT d.known__
    ),
    once AS (
        %19$s
    ),
    gone AS (
        DELETE FROM %5$s_last p
         WHERE p.srvid = _srvid AND NOT EXISTS (SELECT 1 FROM s WHERE %6$s) %20$s
        RETURNING p.*
    )
    INSERT INTO %5$s_current (srvid, ts %11$s)
    SELECT _srvid, coalesce((SELECT max(ts) FROM s), now()) %11$s FROM gone
     WHERE %21$s;

    IF _first THEN
        INSERT INTO pgfleet.metric_state (srvid, module, first_ts) VALUES (_srvid, %1$L, now());
    END IF;
END;
$f$,
        _module, m.src_function::regproc, reset,
        -- 4: previous counter values
        pgfleet._list(m.counters, ', p.%1$I AS %1$I__prev', ''),
        base, keyjoin, changed,
        -- 8: keys; 9: counter deltas.  A new entry seen after the first
        -- snapshot started since then: all of its value is new.  On the very
        -- first snapshot nothing is known about the past, so no delta.
        pgfleet._list(m.keys, ', j.%I', ''),
        pgfleet._list(m.counters, ', CASE WHEN NOT j.known__ THEN CASE WHEN _first THEN NULL ELSE j.%1$I END '
                                  'WHEN j.reset__ THEN j.%1$I ELSE j.%1$I - j.%1$I__prev END AS %1$I', ''),
        -- 10: deltas, gauges, onces, raw counters and epoch as they came
        pgfleet._list(m.deltas || m.gauges || m.onces, ', j.%I', '')
            || pgfleet._list(m.counters, ', j.%1$I AS %1$I__raw', '')
            || CASE WHEN m.epoch IS NULL THEN '' ELSE format(', j.%I AS epoch__raw', m.epoch) END,
        -- 11, 12: key and value columns of current
        pgfleet._list(m.keys, ', %I', ''),
        pgfleet._list(m.counters || m.deltas || m.gauges, ', %I', ''),
        -- 13, 14: and their values.  A zero delta is stored as NULL: one bit
        -- in the row's null bitmap instead of eight bytes, and most deltas of
        -- most entries are zero.  Readers sum deltas; sum() skips NULLs.
        pgfleet._list(m.keys, ', d.%I', ''),
        pgfleet._list(m.counters || m.deltas, ', nullif(d.%I, 0)', '') || pgfleet._list(m.gauges, ', d.%I', ''),
        -- 15: the new delta base
        CASE WHEN m.epoch IS NULL THEN '' ELSE format(', %I = d.epoch__raw', m.epoch) END
            || pgfleet._list(m.counters, ', %1$I = d.%1$I__raw', '')
            || pgfleet._list(m.gauges, ', %1$I = d.%1$I', ''),
        pgfleet._list(m.keys, ' AND p.%1$I = d.%1$I', ''),
        -- 17, 18: columns of last for new entries, and their values
        CASE WHEN m.epoch IS NULL THEN '' ELSE format(', %I', m.epoch) END
            || pgfleet._list(m.counters || m.gauges, ', %I', ''),
        CASE WHEN m.epoch IS NULL THEN '' ELSE ', d.epoch__raw' END
            || pgfleet._list(m.counters, ', d.%1$I__raw', '') || pgfleet._list(m.gauges, ', d.%I', ''),
        -- 19: once-columns of entries not seen before
        CASE WHEN m.onces = '{}' THEN 'SELECT 1'
             ELSE format('INSERT INTO %s_once (srvid %s, first_seen %s) SELECT _srvid %s, d.ts %s FROM d '
                         'WHERE NOT d.known__ ON CONFLICT DO NOTHING',
                         base, pgfleet._list(m.keys, ', %I', ''), pgfleet._list(m.onces, ', %I', ''),
                         pgfleet._list(m.keys, ', d.%I', ''), pgfleet._list(m.onces, ', d.%I', '')) END,
        -- 20: only entries whose scope was collected this time can vanish
        CASE WHEN m.scope IS NULL THEN ''
             ELSE format('AND p.%1$I IN (SELECT %1$I FROM s)', m.scope) END,
        CASE WHEN m.gauges = '{}' THEN 'false' ELSE 'true' END);
END;
$body$;

CREATE FUNCTION pgfleet.metric_partition(_module text, _day date)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    part text := format('%s_history_%s', _module, to_char(_day, 'YYYYMMDD'));
BEGIN
    IF to_regclass('pgfleet.' || quote_ident(part)) IS NULL THEN
        -- Bounds in UTC, whatever the session's TimeZone.
        -- toast_tuple_target at its minimum: compress the points of a row
        -- as soon as it is 128 bytes, not 2 kB (deltas are mostly zeros and
        -- compress well).
        EXECUTE format('CREATE TABLE pgfleet.%I PARTITION OF pgfleet.%I FOR VALUES FROM (%L) TO (%L) WITH (toast_tuple_target = 128)',
                       part, _module || '_history',
                       (_day::timestamp AT TIME ZONE 'UTC'),
                       ((_day + 1)::timestamp AT TIME ZONE 'UTC'));
    END IF;
END;
$$;

-- Fold a server's not-yet-aggregated rows into one history row per key.
CREATE FUNCTION pgfleet.metric_aggregate(_module text, _srvid integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    m pgfleet.metric_sources;
    base text;
    d date;
    vals text[];
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    base := 'pgfleet.' || quote_ident(_module);
    -- The point type's own attribute order, which a source that gained a
    -- column later no longer shares with its column lists.
    vals := ARRAY(SELECT a.attname::text FROM pg_attribute a
                   WHERE a.attrelid = (SELECT typrelid FROM pg_type WHERE oid = (base || '_point')::regtype)
                     AND a.attnum > 1 AND NOT a.attisdropped ORDER BY a.attnum);
    FOR d IN EXECUTE format($q$SELECT DISTINCT (min(ts) AT TIME ZONE 'UTC')::date
                                 FROM %s_current WHERE srvid = $1 GROUP BY srvid %s$q$,
                            base, pgfleet._list(m.keys, ', %I', ''))
             USING _srvid
    LOOP
        PERFORM pgfleet.metric_partition(_module, d);
    END LOOP;
    EXECUTE format($q$
        WITH moved AS (DELETE FROM %1$s_current WHERE srvid = $1 RETURNING *)
        INSERT INTO %1$s_history (srvid %2$s, ts_start, ts_end, points)
        SELECT $1 %2$s, min(ts), max(ts), array_agg(ROW(ts %3$s)::%1$s_point ORDER BY ts)
          FROM moved GROUP BY srvid %2$s$q$,
        base, pgfleet._list(m.keys, ', %I', ''), pgfleet._list(vals, ', %I', ''))
    USING _srvid;
END;
$$;

-- Drop what retention no longer covers.  Partitions older than every
-- server's retention are dropped whole (disk freed at once); rows of a server
-- whose retention is shorter than others' are deleted and their space reused.
CREATE FUNCTION pgfleet.metric_purge(_module text, _srvid integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    m pgfleet.metric_sources;
    base text;
    cutoff timestamptz;
    oldest_kept timestamptz;
    part record;
    still_used boolean;
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    base := 'pgfleet.' || quote_ident(_module);
    SELECT now() - retention INTO cutoff FROM pgfleet.servers WHERE srvid = _srvid;
    SELECT now() - max(retention) INTO oldest_kept FROM pgfleet.servers;

    EXECUTE format('DELETE FROM %s_history WHERE srvid = $1 AND ts_start < $2 AND ts_end < $2', base)
    USING _srvid, cutoff;

    FOR part IN
        SELECT c.oid::regclass AS rel,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = (base || '_history')::regclass
    LOOP
        CONTINUE WHEN part.upper >= oldest_kept;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE ts_end >= $1)', part.rel)
        INTO still_used USING oldest_kept;
        IF NOT still_used THEN
            EXECUTE format('DROP TABLE %s', part.rel);
        END IF;
    END LOOP;

    IF m.onces <> '{}' THEN
        -- A once-row is kept while its entry is live or still has history.
        EXECUTE format($q$
            DELETE FROM %1$s_once o
             WHERE o.srvid = $1 AND o.first_seen < $2
               AND NOT EXISTS (SELECT 1 FROM %1$s_last l WHERE l.srvid = o.srvid %2$s)
               AND NOT EXISTS (SELECT 1 FROM %1$s_history h WHERE h.srvid = o.srvid %3$s)
               AND NOT EXISTS (SELECT 1 FROM %1$s_current c WHERE c.srvid = o.srvid %4$s)$q$,
            base, pgfleet._list(m.keys, ' AND l.%1$I = o.%1$I', ''),
            pgfleet._list(m.keys, ' AND h.%1$I = o.%1$I', ''),
            pgfleet._list(m.keys, ' AND c.%1$I = o.%1$I', ''))
        USING _srvid, cutoff;
    END IF;
END;
$$;

-- Everything a metric source holds about one server (pgfleet server remove --purge).
CREATE FUNCTION pgfleet.metric_forget(_module text, _srvid integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    base text := 'pgfleet.' || quote_ident(_module);
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['_last', '_current', '_history'] LOOP
        EXECUTE format('DELETE FROM %s%s WHERE srvid = $1', base, t) USING _srvid;
    END LOOP;
    IF to_regclass(base || '_once') IS NOT NULL THEN
        EXECUTE format('DELETE FROM %s_once WHERE srvid = $1', base) USING _srvid;
    END IF;
    DELETE FROM pgfleet.metric_state WHERE srvid = _srvid AND module = _module;
END;
$$;

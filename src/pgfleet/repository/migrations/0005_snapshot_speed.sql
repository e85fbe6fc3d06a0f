-- A cheaper snapshot function per source (issue 2: the remote snapshot's
-- speed bar), same results.
--
-- 1. The staged rows meet the delta base in ONE full join: an entry is new
--    (no base row), changed, or gone (no staged row), read in one pass over
--    <module>_last instead of three (the comparison, the UPDATE's join and
--    the vanished entries' anti-join).  The base rows are then updated and
--    deleted by ctid, which the join already read.
--
-- 2. The web UI's rollups (migration 0004) are written by the snapshot
--    statement itself, from the rows it inserts into <module>_current, rather
--    than by a statement trigger on <module>_current: no transition table to
--    capture, no trigger call, no second look at <module>_last.  Same rows:
--    counters and deltas summed per rollup key and snapshot (tombstones
--    included), gauges summed over the live entries after the snapshot, and
--    what the server's retention no longer covers deleted.  The trigger and
--    its function are dropped; pgfleet.metric_extend (0004) makes the rollup
--    table and then the snapshot function again, instead of the trigger.
--
-- 3. Less to carry: once-columns (query texts) only for new entries, the
--    staged rows read straight from the query_source function when only the
--    join reads them, and a source with nothing staged and nothing known
--    returns at once.
--
-- The snapshot function is still generated once per source (at registration,
-- and here for the sources that exist), so PL/pgSQL caches its plan.

CREATE OR REPLACE FUNCTION pgfleet.metric_snapshot_body(_module text)
RETURNS text LANGUAGE plpgsql AS $body$
DECLARE
    m pgfleet.metric_sources;
    r pgfleet.metric_rollups;
    base text;
    keyjoin text;
    changed text;
    reset text;
    in_scope text;
    tracked text[];
    rollup regclass;
    rsums text[] := '{}';
    rgauges text[] := '{}';
    tomb text;
    tail text;
    staged text;
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    -- The staged rows: what the query_source function returns.
    staged := format('SELECT t.*, true AS here__ FROM %s(_srvid) t', m.src_function::regproc);
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
    -- Only entries whose scope was collected this time can vanish.
    in_scope := CASE WHEN m.scope IS NULL THEN 'true'
                     ELSE format('p.%1$I IN (SELECT s2.%1$I FROM s s2)', m.scope) END;

    -- Vanished entries: a tombstone row (NULL values) when there are gauges.
    tomb := format($t$
        INSERT INTO %1$s_current (srvid, ts %2$s)
        SELECT _srvid, %3$s %2$s FROM gone
         WHERE %4$s$t$,
        base, pgfleet._list(m.keys, ', %I', ''),
        CASE WHEN m.gauges = '{}' THEN 'now()' ELSE 'coalesce((SELECT max(ts) FROM s), now())' END,
        CASE WHEN m.gauges = '{}' THEN 'false' ELSE 'true' END);

    SELECT * INTO r FROM pgfleet.metric_rollups WHERE module = _module;
    rollup := to_regclass(base || '_rollup');
    IF r.module IS NULL OR rollup IS NULL THEN
        tail := tomb;
    ELSE
        SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum)
                            FILTER (WHERE a.attname = ANY (m.counters || m.deltas)), '{}'),
               coalesce(array_agg(a.attname::text ORDER BY a.attnum)
                            FILTER (WHERE a.attname = ANY (r.gauges)), '{}')
          INTO rsums, rgauges
          FROM pg_attribute a
         WHERE a.attrelid = rollup AND a.attnum > 0 AND NOT a.attisdropped;
        -- n: every row this snapshot wrote into <module>_current: ins, and
        -- the tombstones when there can be any.
        tail := format($t$%1$s%2$s%3$s
    DELETE FROM %4$s_rollup o USING pgfleet.servers v
     WHERE o.srvid = _srvid AND v.srvid = _srvid
       AND o.ts < (SELECT max(n.ts) FROM %5$s n) - v.retention$t$,
            CASE WHEN m.gauges = '{}' THEN '' ELSE format($t$,
    tomb AS (%1$s
        RETURNING srvid, ts %2$s %3$s
    ),
    n AS (SELECT * FROM ins UNION ALL SELECT * FROM tomb)$t$,
                tomb, pgfleet._list(r.keys, ', %I', ''), pgfleet._list(rsums, ', %I', '')) END,
            CASE WHEN rsums = '{}' THEN '' ELSE format($t$,
    sums AS (
        INSERT INTO %1$s_rollup (srvid %2$s, ts %3$s)
        SELECT _srvid %4$s, n.ts %5$s FROM %7$s n GROUP BY %6$s n.ts
    )$t$,
                base, pgfleet._list(r.keys, ', %I', ''), pgfleet._list(rsums, ', %I', ''),
                pgfleet._list(r.keys, ', n.%I', ''),
                pgfleet._list(rsums, ', nullif(sum(n.%1$I), 0)', ''),
                pgfleet._list(r.keys, 'n.%I, ', ''),
                CASE WHEN m.gauges = '{}' THEN 'ins' ELSE 'n' END) END,
            -- Gauges are summed over the entries live once this snapshot is
            -- written: the staged ones, and those of <module>_last out of scope.
            CASE WHEN rgauges = '{}' THEN '' ELSE format($t$,
    live AS (
        SELECT %1$s
          FROM s FULL JOIN (SELECT * FROM %2$s_last l WHERE l.srvid = _srvid) p ON %3$s
         WHERE s.here__ OR NOT coalesce(%4$s, false)
    ),
    gauges AS (
        INSERT INTO %2$s_rollup (srvid %5$s, ts %6$s)
        SELECT _srvid %7$s, (SELECT max(n.ts) FROM %10$s n) %8$s FROM live
         WHERE EXISTS (SELECT 1 FROM %10$s n)
         GROUP BY %9$s HAVING count(*) > 0
    )$t$,
                concat_ws(', ',
                          nullif(pgfleet._list(r.keys, 'CASE WHEN s.here__ THEN s.%1$I ELSE p.%1$I END AS %1$I'), ''),
                          nullif(pgfleet._list(rgauges, 'CASE WHEN s.here__ THEN s.%1$I ELSE p.%1$I END AS %1$I'), '')),
                base, keyjoin, in_scope,
                pgfleet._list(r.keys, ', %I', ''), pgfleet._list(rgauges, ', %I', ''),
                pgfleet._list(r.keys, ', live.%I', ''),
                pgfleet._list(rgauges, ', sum(live.%1$I)', ''),
                CASE WHEN r.keys = '{}' THEN '()' ELSE pgfleet._list(r.keys, 'live.%I') END,
                CASE WHEN m.gauges = '{}' THEN 'ins' ELSE 'n' END) END,
            base, CASE WHEN m.gauges = '{}' THEN 'ins' ELSE 'n' END);
    END IF;

    -- One statement: read the staged rows once, meet them with the delta
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
    -- Nothing staged and nothing known (no standby, no slot...): nothing to
    -- write, and no need to start the statement below.
    IF NOT EXISTS (SELECT 1 FROM %5$s_last WHERE srvid = _srvid)
       AND NOT EXISTS (SELECT 1 FROM (%22$s) e) THEN
        IF _first THEN
            INSERT INTO pgfleet.metric_state (srvid, module, first_ts) VALUES (_srvid, %1$L, now());
        END IF;
        RETURN;
    END IF;
    WITH s AS %19$s (%22$s),
    j AS MATERIALIZED (
        SELECT (p.srvid IS NOT NULL) AS known__, (s.here__ IS NULL) AS gone__, p.ctid__,
               (p.srvid IS NOT NULL AND (%3$s)) AS reset__, s.ts %21$s %4$s
          FROM s FULL JOIN (SELECT l.*, l.ctid AS ctid__ FROM %5$s_last l WHERE l.srvid = _srvid) p
            ON %6$s
         WHERE CASE WHEN s.here__ THEN %7$s ELSE %8$s END
    ),
    x AS MATERIALIZED (
        SELECT * FROM j WHERE NOT j.known__ OR j.gone__
    ),
    ins AS (
        INSERT INTO %5$s_current (srvid, ts %9$s %10$s)
        SELECT _srvid, j.ts %11$s %12$s FROM j WHERE NOT j.gone__
        %13$s
    ),
    upd AS (
        UPDATE %5$s_last p SET ts = j.ts %14$s
          FROM j WHERE j.known__ AND NOT j.gone__ AND p.srvid = _srvid AND p.ctid = j.ctid__
    ),
    new AS (
        INSERT INTO %5$s_last (srvid, ts %9$s %15$s)
        SELECT _srvid, x.ts %20$s %16$s FROM x WHERE NOT x.known__
    ),
    once AS (
        %17$s
    ),
    gone AS (
        DELETE FROM %5$s_last p USING x
         WHERE x.gone__ AND p.srvid = _srvid AND p.ctid = x.ctid__
        RETURNING p.*
    )%18$s;

    IF _first THEN
        INSERT INTO pgfleet.metric_state (srvid, module, first_ts) VALUES (_srvid, %1$L, now());
    END IF;
END;
$f$,
        _module, m.src_function::regproc, reset,
        -- 4: previous counter values
        pgfleet._list(m.counters, ', p.%1$I AS %1$I__prev', ''),
        base, keyjoin, changed, in_scope,
        -- 9, 10: key and value columns of current
        pgfleet._list(m.keys, ', %I', ''),
        pgfleet._list(m.counters || m.deltas || m.gauges, ', %I', ''),
        -- 11: keys; 12: values.  Counters as deltas: a new entry seen after
        -- the first snapshot started since then, all of its value is new; on
        -- the very first snapshot nothing is known about the past, so no
        -- delta.  A zero delta is stored as NULL: one bit in the row's null
        -- bitmap instead of eight bytes, and most deltas of most entries are
        -- zero.  Readers sum deltas; sum() skips NULLs.
        pgfleet._list(m.keys, ', j.%I', ''),
        pgfleet._list(m.counters, ', nullif(CASE WHEN NOT j.known__ THEN CASE WHEN _first THEN NULL ELSE j.%1$I END '
                                  'WHEN j.reset__ THEN j.%1$I ELSE j.%1$I - j.%1$I__prev END, 0)', '')
            || pgfleet._list(m.deltas, ', nullif(j.%I, 0)', '') || pgfleet._list(m.gauges, ', j.%I', ''),
        -- 13: what the rollups need of the rows written
        CASE WHEN r.module IS NULL OR rollup IS NULL THEN ''
             ELSE format('RETURNING srvid, ts %s %s',
                         pgfleet._list(r.keys, ', %I', ''), pgfleet._list(rsums, ', %I', '')) END,
        -- 14: the new delta base: the values as they came
        CASE WHEN m.epoch IS NULL THEN '' ELSE format(', %1$I = j.%1$I', m.epoch) END
            || pgfleet._list(m.counters || m.gauges, ', %1$I = j.%1$I', ''),
        -- 15, 16: columns of last for new entries, and their values
        CASE WHEN m.epoch IS NULL THEN '' ELSE format(', %I', m.epoch) END
            || pgfleet._list(m.counters || m.gauges, ', %I', ''),
        CASE WHEN m.epoch IS NULL THEN '' ELSE format(', x.%I', m.epoch) END
            || pgfleet._list(m.counters || m.gauges, ', x.%I', ''),
        -- 17: once-columns of entries not seen before
        CASE WHEN m.onces = '{}' THEN 'SELECT 1'
             ELSE format('INSERT INTO %s_once (srvid %s, first_seen %s) SELECT _srvid %s, x.ts %s FROM x '
                         'WHERE NOT x.known__ ON CONFLICT DO NOTHING',
                         base, pgfleet._list(m.keys, ', %I', ''), pgfleet._list(m.onces, ', %I', ''),
                         pgfleet._list(m.keys, ', x.%I', ''), pgfleet._list(m.onces, ', x.%I', '')) END,
        -- 18: tombstones, rollups
        CASE WHEN r.module IS NULL OR rollup IS NULL THEN E'\n   ' || tail ELSE tail END,
        -- 19: the staged rows are read once: when only the join reads them,
        -- straight from the function's result, else kept for the others.
        CASE WHEN m.gauges = '{}' AND m.scope IS NULL AND rgauges = '{}' THEN 'NOT MATERIALIZED'
             ELSE 'MATERIALIZED' END,
        -- 20: keys of the new entries
        pgfleet._list(m.keys, ', x.%I', ''),
        -- 21: the staged values; once-columns (a query text...) only for
        -- new entries, the only ones that store them
        pgfleet._list(m.keys || m.counters || m.deltas || m.gauges, ', s.%I', '')
            || CASE WHEN m.epoch IS NULL OR m.epoch = ANY (m.keys || m.counters || m.deltas || m.gauges) THEN ''
                    ELSE format(', s.%I', m.epoch) END
            || pgfleet._list(m.onces, ', CASE WHEN p.srvid IS NULL THEN s.%1$I END AS %1$I', ''),
        -- 22: the staged rows
        staged);
END;
$body$;

-- Rollups written by the snapshot function: drop the 0004 trigger, and
-- generate the snapshot function again now that the rollup table exists.
CREATE FUNCTION pgfleet.metric_inline_rollup(_module text)
RETURNS void LANGUAGE plpgsql
SET client_min_messages = warning AS $$
DECLARE
    base text := 'pgfleet.' || quote_ident(_module);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgfleet.metric_sources WHERE module = _module) THEN
        RETURN;
    END IF;
    IF to_regclass(base || '_current') IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS rollup_add ON %s_current', base);
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS %s_rollup_add()', base);
    EXECUTE format('CREATE OR REPLACE FUNCTION %s_snapshot(_srvid integer) RETURNS void LANGUAGE plpgsql AS %L',
                   base, pgfleet.metric_snapshot_body(_module));
END;
$$;

-- metric_extend as in 0004, but the rollups end in the snapshot function: it
-- creates the rollup table and regenerates the snapshot function instead of
-- the trigger.  Sources created or re-registered later get it from the
-- deferred trigger on pgfleet.metric_sources, unchanged.
CREATE OR REPLACE FUNCTION pgfleet.metric_extend(_module text)
RETURNS void LANGUAGE plpgsql
-- "already exists, skipping" for every column at every upgrade helps nobody.
SET client_min_messages = warning AS $body$
DECLARE
    m pgfleet.metric_sources;
    r pgfleet.metric_rollups;
    base text := 'pgfleet.' || quote_ident(_module);
    hist regclass := to_regclass('pgfleet.' || quote_ident(_module || '_history'));
    pt regtype := to_regtype('pgfleet.' || quote_ident(_module || '_point'));
    cols text[];     -- the point type's attributes after ts, in order
    types text[];
    summed text[];   -- counters and deltas among them
    agg_row text;
    keydefs text;
    valdefs text;
    sumdefs text;
    i integer;
BEGIN
    SELECT * INTO m FROM pgfleet.metric_sources WHERE module = _module;
    IF m.module IS NULL OR hist IS NULL OR pt IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(a.attname::text ORDER BY a.attnum),
           array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
      INTO cols, types
      FROM pg_attribute a
     WHERE a.attrelid = (SELECT typrelid FROM pg_type WHERE oid = pt)
       AND a.attnum > 1 AND NOT a.attisdropped;
    cols := coalesce(cols, '{}');
    types := coalesce(types, '{}');
    summed := ARRAY(SELECT c FROM unnest(cols) c WHERE c = ANY (m.counters || m.deltas));

    -- The window total: sums of counters and deltas (NULL for zero, as in
    -- the points), gauges as at the window's last point.  Chunks are the
    -- same per 10 consecutive points, with the ts of their first point
    -- alongside: a range that cuts a window reads its whole chunks and
    -- unnests the points of the one chunk it cuts.
    agg_row := 'max(p.ts)';
    FOR i IN 1 .. coalesce(array_length(cols, 1), 0) LOOP
        IF cols[i] = ANY (summed) THEN
            agg_row := agg_row || format(', nullif(sum(p.%I), 0)::%s', cols[i], types[i]);
        ELSE
            agg_row := agg_row || format(', (_points[%%1$s]).%I', cols[i]);
        END IF;
    END LOOP;
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$s_total(_points %1$s_point[])
                      RETURNS %1$s_point LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
                      $t$SELECT ROW(%2$s)::%1$s_point FROM unnest(_points) p$t$$f$,
                   base, format(agg_row, 'cardinality(_points)'));
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$s_chunks(_points %1$s_point[])
                      RETURNS %1$s_point[] LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
                      $t$SELECT array_agg(c ORDER BY g) FROM (
                             SELECT (p.ordinality - 1) / 10 AS g, ROW(%2$s)::%1$s_point AS c
                               FROM unnest(_points) WITH ORDINALITY p GROUP BY 1) s$t$$f$,
                   base, format(agg_row, 'max(p.ordinality)'));
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$s_chunk_ts(_points %1$s_point[])
                      RETURNS timestamptz[] LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
                      $t$SELECT array_agg(p.ts ORDER BY p.ordinality)
                           FROM unnest(_points) WITH ORDINALITY p
                          WHERE (p.ordinality - 1) %% 10 = 0$t$$f$, base);
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = hist AND attname = 'total' AND NOT attisdropped) THEN
        -- One rewrite computes them for the rows already there.  The total
        -- stays in the row (MAIN) rather than in TOAST, where the points go.
        EXECUTE format('ALTER TABLE %1$s_history'
                       ' ADD COLUMN total %1$s_point %2$s GENERATED ALWAYS AS (%1$s_total(points)) STORED,'
                       ' ADD COLUMN chunks %1$s_point[] GENERATED ALWAYS AS (%1$s_chunks(points)) STORED,'
                       ' ADD COLUMN chunk_ts timestamptz[] GENERATED ALWAYS AS (%1$s_chunk_ts(points)) STORED',
                       base, CASE WHEN current_setting('server_version_num')::int >= 160000
                                  THEN 'STORAGE MAIN' ELSE '' END);
        EXECUTE format('ALTER TABLE %s_history ALTER COLUMN total SET STORAGE MAIN', base);
    END IF;

    -- <module>_sums: the same columns as <module>_series without ts: one row
    -- per fully covered window, per whole chunk and per point of a cut chunk
    -- of the windows at the range's edges, and per not-yet-aggregated row.
    -- A plain SQL function, inlined by the planner.
    keydefs := pgfleet._coldefs(hist, m.keys);
    valdefs := (SELECT string_agg(format('%I %s', c, t), ', ' ORDER BY o)
                  FROM unnest(cols, types) WITH ORDINALITY AS u(c, t, o));
    EXECUTE format('DROP FUNCTION IF EXISTS %s_sums(integer, timestamptz, timestamptz)', base);
    IF cols <> '{}' THEN
        EXECUTE format($f$CREATE FUNCTION %1$s_sums(_srvid integer, _from timestamptz, _to timestamptz)
                          RETURNS TABLE (%2$s)
                          LANGUAGE sql STABLE AS $s$
                            SELECT %3$s %4$s
                              FROM %1$s_history h
                             WHERE h.srvid = _srvid AND h.ts_start >= _from AND h.ts_end <= _to
                            UNION ALL
                            SELECT %3$s %5$s
                              FROM %1$s_history h,
                                   unnest(h.chunk_ts, h.chunks) AS c(first_ts, ts, %8$s)
                             WHERE h.srvid = _srvid AND h.ts_start <= _to AND h.ts_end >= _from
                               AND (h.ts_start < _from OR h.ts_end > _to)
                               AND c.first_ts >= _from AND c.ts <= _to
                            UNION ALL
                            SELECT %3$s %6$s
                              FROM %1$s_history h,
                                   unnest(h.chunk_ts, h.chunks) WITH ORDINALITY AS c(first_ts, ts, %8$s, o),
                                   unnest(h.points[(c.o - 1) * 10 + 1 : c.o * 10]) AS p
                             WHERE h.srvid = _srvid AND h.ts_start <= _to AND h.ts_end >= _from
                               AND (h.ts_start < _from OR h.ts_end > _to)
                               AND c.ts >= _from AND c.first_ts <= _to
                               AND (c.first_ts < _from OR c.ts > _to)
                               AND p.ts >= _from AND p.ts <= _to
                            UNION ALL
                            SELECT %7$s FROM %1$s_current c
                             WHERE c.srvid = _srvid AND c.ts >= _from AND c.ts <= _to
                          $s$$f$,
                       base, concat_ws(', ', nullif(keydefs, ''), valdefs),
                       pgfleet._list(m.keys, 'h.%I, ', ''), pgfleet._list(cols, '(h.total).%I'),
                       pgfleet._list(cols, 'c.%I'), pgfleet._list(cols, 'p.%I'),
                       pgfleet._list(m.keys, 'c.%I, ', '') || pgfleet._list(cols, 'c.%I'),
                       pgfleet._list(cols, '%I'));
    END IF;

    SELECT * INTO r FROM pgfleet.metric_rollups WHERE module = _module;
    IF r.module IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s_rollup (srvid integer NOT NULL'
                   ' REFERENCES pgfleet.servers ON DELETE CASCADE%s, ts timestamptz NOT NULL)',
                   base, CASE WHEN r.keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(hist, r.keys) END);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s_rollup (srvid, ts)', _module || '_rollup_srvid_ts', base);
    FOR i IN 1 .. coalesce(array_length(cols, 1), 0) LOOP
        IF cols[i] = ANY (summed || r.gauges) THEN
            EXECUTE format('ALTER TABLE %s_rollup ADD COLUMN IF NOT EXISTS %I %s', base, cols[i],
                           CASE WHEN types[i] IN ('integer', 'smallint') THEN 'bigint' ELSE types[i] END);
        END IF;
    END LOOP;
    -- The rollups are written by the snapshot function (0005), not a trigger.
    PERFORM pgfleet.metric_inline_rollup(_module);
END;
$body$;

-- The sources of an existing repository.
SELECT pgfleet.metric_inline_rollup(module) FROM pgfleet.metric_sources;

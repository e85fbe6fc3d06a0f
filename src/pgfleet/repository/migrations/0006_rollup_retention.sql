-- The snapshot function per source, again, with one change to the body 0005
-- generates (same results):
--
-- The rollups past the server's retention were found by joining the
-- server's row, so the cutoff could not bound the index scan: every snapshot
-- of every source with rollups read all the rollup rows of the server (a
-- week of them, per database or per backend type, in production) to delete
-- the few that went out of retention.  The cutoff is now a value computed
-- once per statement, and the (srvid, ts) index finds only the rows to
-- delete.
--
-- The rest is 0005's, unchanged; the functions are generated again below.

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
    DELETE FROM %4$s_rollup o
     WHERE o.srvid = _srvid
       AND o.ts < (SELECT max(n.ts) FROM %5$s n)
                  - (SELECT v.retention FROM pgfleet.servers v WHERE v.srvid = _srvid)$t$,
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

-- The snapshot functions of the sources that exist, generated again.
SELECT pgfleet.metric_inline_rollup(module) FROM pgfleet.metric_sources;

-- Faster reads of the compact history (0012), measured by bench/series.py.
--
-- Nothing is stored differently: only the generated readers change, made
-- again for every source at the end.

-- <m>_series, as in 0012, but for the point positions: a window's row
-- whose entry changed at every snapshot (all bits of at set: most rows of a
-- busy server) has its points at positions 1..n, and skips splitting at
-- into characters and searching them (~8% of reading one statement's week).
--
-- <m>_series: every point of a server in a time range.  Plain SQL, inlined
-- by the planner (no SET clause: every name is qualified).  A filter on keys
-- reaches <m>_keys' index, then the history's (srvid, keyid, ts_start).  A
-- row's columns are split once (d, which the points' unnest depends on, so
-- that it is not split again per point), and only those the caller reads:
-- the planner drops the others from the inlined query.
CREATE OR REPLACE FUNCTION pgfleet.metric_series(_module text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    m pgfleet.metric_sources;
    base text := 'pgfleet.' || quote_ident(_module);
    tmp regclass;
    values_ text[];
    mc record;
    decoded text;
    v1 text := '';
    hk text[];
    ddl text;
BEGIN
    SELECT * INTO m FROM pgfleet.metric_sources WHERE module = _module;
    tmp := to_regclass(m.src_function || '_tmp');
    IF m.module IS NULL OR tmp IS NULL OR to_regclass(base || '_keys') IS NULL THEN
        RETURN;
    END IF;
    values_ := m.counters || m.deltas || m.gauges;
    hk := pgfleet._hkeys(m);
    SELECT * INTO mc FROM pgfleet.metric_columns(_module);
    -- The columns in the order the function returns them, decoded from v's.
    SELECT string_agg(', ' || CASE WHEN o.i IS NULL THEN format('NULL::%s', pgfleet._qualtype(a.atttypid))
                                   ELSE pgfleet._elem(format('d.a%s[p.o]', o.i), mc.types[o.i]) END, '' ORDER BY x.n)
      INTO decoded
      FROM unnest(values_) WITH ORDINALITY AS x(c, n)
      JOIN pg_attribute a ON a.attrelid = tmp AND a.attname = x.c
      LEFT JOIN LATERAL (SELECT array_position(mc.cols, x.c) AS i) o ON true;
    IF to_regclass(base || '_history_v1') IS NOT NULL THEN
        v1 := format($s$
                        UNION ALL
                        SELECT p.ts%2$s%3$s
                          FROM %1$s, pg_catalog.unnest(h.points) AS p
                         WHERE h.srvid OPERATOR(pg_catalog.=) _srvid
                           AND h.ts_start OPERATOR(pg_catalog.<=) _to
                           AND h.ts_end OPERATOR(pg_catalog.>=) _from
                           AND p.ts OPERATOR(pg_catalog.>=) _from AND p.ts OPERATOR(pg_catalog.<=) _to$s$,
                     base || '_history_v1 h' || pgfleet._v1_join(_module),
                     (SELECT string_agg(format(CASE WHEN c = ANY (m.keys) THEN ', h.%I' ELSE ', o.%I' END, c), '' ORDER BY n)
                        FROM unnest(hk) WITH ORDINALITY AS u(c, n)),
                     pgfleet._list(values_, ', p.%I', ''));
    END IF;
    ddl := format($f$CREATE OR REPLACE FUNCTION %1$s_series(_srvid integer, _from timestamptz, _to timestamptz)
                      RETURNS TABLE (ts timestamptz%2$s%3$s)
                      LANGUAGE sql STABLE AS $s$
                        SELECT d.wts[p.pos]%4$s%5$s
                          FROM %1$s_keys k
                          JOIN %1$s_history h ON h.srvid OPERATOR(pg_catalog.=) k.srvid AND h.keyid OPERATOR(pg_catalog.=) k.keyid
                          CROSS JOIN LATERAL (SELECT (SELECT w.ts FROM %1$s_windows w
                                                       WHERE w.srvid OPERATOR(pg_catalog.=) h.srvid
                                                         AND w.ts_start OPERATOR(pg_catalog.=) h.ts_start) AS wts,
                                                     %7$s AS ps,
                                                     pg_catalog.length(pg_catalog.replace((h.at)::pg_catalog.text, '0', '')) AS n, %6$s
                                                FROM (SELECT pg_catalog.string_to_array(h.v, ';') AS c OFFSET 0) x OFFSET 0) d
                          CROSS JOIN LATERAL (SELECT COALESCE(d.ps[g.o], g.o) AS pos, g.o
                                                FROM pg_catalog.generate_series(1, d.n) AS g(o)) p
                         WHERE k.srvid OPERATOR(pg_catalog.=) _srvid AND h.srvid OPERATOR(pg_catalog.=) _srvid
                           AND h.ts_start OPERATOR(pg_catalog.<=) _to
                           AND h.ts_end OPERATOR(pg_catalog.>=) _from
                           AND d.wts[p.pos] OPERATOR(pg_catalog.>=) _from AND d.wts[p.pos] OPERATOR(pg_catalog.<=) _to%8$s
                        UNION ALL
                        SELECT c.ts%9$s%10$s FROM %1$s_current c
                         WHERE c.srvid OPERATOR(pg_catalog.=) _srvid
                           AND c.ts OPERATOR(pg_catalog.>=) _from AND c.ts OPERATOR(pg_catalog.<=) _to
                      $s$$f$,
                   base,
                   CASE WHEN hk = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, hk) END,
                   CASE WHEN values_ = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, values_) END,
                   pgfleet._list(hk, ', k.%I', ''), coalesce(decoded, ''),
                   coalesce((SELECT string_agg(pgfleet._arr(i, mc.types[i]), ', ' ORDER BY i)
                               FROM generate_subscripts(mc.cols, 1) i), '1 AS none'),
                   $x$CASE WHEN pg_catalog.strpos((h.at)::pg_catalog.text, '0') OPERATOR(pg_catalog.<>) 0
                           THEN pg_catalog.array_positions(pg_catalog.string_to_array((h.at)::pg_catalog.text, NULL), '1') END$x$,
                   v1,
                   pgfleet._list(hk, ', c.%I', ''), pgfleet._list(values_, ', c.%I', ''));
    BEGIN
        EXECUTE ddl;
    EXCEPTION WHEN invalid_function_definition THEN
        -- Its result columns changed (history keys given to a source):
        -- made again, which fails if a view of the user's depends on it.
        EXECUTE format('DROP FUNCTION %s_series(integer, timestamptz, timestamptz)', base);
        EXECUTE ddl;
    END;
END;
$fn$;

DO $fn$
DECLARE
    m record;
BEGIN
    FOR m IN SELECT module FROM pgfleet.metric_sources ORDER BY module LOOP
        PERFORM pgfleet.metric_series(m.module);
    END LOOP;
END;
$fn$;

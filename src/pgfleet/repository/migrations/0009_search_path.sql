-- Every repository function runs with its own search_path (trojan functions).
--
-- A function runs with its caller's search_path unless it sets one.  A role
-- that may create objects in a schema on that path (public, when CREATE on
-- it was granted; any schema that a database or role setting puts on it)
-- could then have the collector, or a reader of the web UI, run its own
-- function, operator, view or type instead of PostgreSQL's.  It does not even
-- need its schema before pg_catalog: an overload whose argument types match
-- exactly beats pg_catalog's polymorphic or implicitly cast one, such as
-- public.pg_advisory_xact_lock(integer) against pg_catalog's (bigint) in
-- snapshot_lock(), or format(text, text) against format(text, VARIADIC "any").
--
-- 1. Every function in schema pgfleet runs with search_path = pg_catalog,
--    pg_temp: PostgreSQL's objects, then temporary tables.  The bodies write
--    pgfleet's own objects pgfleet.x already.  What they call runs with that
--    path too: a user's registered function that names its tables without a
--    schema must name them, or set its own search_path, as on the monitored
--    servers, where the collector's sessions have the same path.  Function
--    names registered without a schema are qualified below, with the schema
--    they resolve to now.
-- 2. The generators (create_metric_source, metric_extend,
--    metric_inline_rollup and metric_series, new: the series reader that
--    create_metric_source made inline) give each source's functions the same
--    setting, so sources created later are pinned too, and here they make
--    those of the sources that exist again.
-- 3. But <module>_series and <module>_sums, the readers behind the web UI:
--    plain SQL functions that the planner inlines into the caller's query,
--    pushing key and time filters into the index scans.  A SET clause
--    forbids inlining (one statement's series over 7 days went from 4.9 ms
--    to 2,288 ms), so their bodies name everything with its schema instead:
--    pg_catalog.unnest, OPERATOR(pg_catalog.=), pgfleet's tables.
-- 4. A SET clause costs a setting saved and restored per call: nothing
--    measurable, even on <module>_total, _chunks and _chunk_ts, which run per
--    history row written (8,000 rows: 1,106 ms without, 1,111 ms with).

-- Registered names without a schema, with the schema they resolve to now,
-- on the migrating session's path: with the path pinned they would resolve
-- no more.  (Everything in these statements is qualified: that path is
-- anybody's.)
UPDATE pgfleet.functions f
   SET function_name = pg_catalog.format('%I.%I', n.nspname, p.proname)
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
 WHERE pg_catalog.cardinality(pg_catalog.parse_ident(f.function_name, false)) OPERATOR(pg_catalog.=) 1
   AND p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regproc(f.function_name);
UPDATE pgfleet.functions f
   SET query_source = pg_catalog.format('%I.%I', n.nspname, p.proname)
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
 WHERE pg_catalog.cardinality(pg_catalog.parse_ident(f.query_source, false)) OPERATOR(pg_catalog.=) 1
   AND p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regproc(f.query_source);
UPDATE pgfleet.metric_sources m
   SET src_function = pg_catalog.format('%I.%I', n.nspname, p.proname)
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
 WHERE pg_catalog.cardinality(pg_catalog.parse_ident(m.src_function, false)) OPERATOR(pg_catalog.=) 1
   AND p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regproc(m.src_function);

-- The rest of this script, whatever the migrating session's path: no type
-- named text or operator = of somebody else's in what it creates.  Restored
-- at the end, for whatever runs after it in the same transaction.
SELECT pg_catalog.set_config('pgfleet.migrating_search_path',
                             pg_catalog.current_setting('search_path'), true),
       pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

-- A source's series reader, <module>_series(srvid, from, to): every stored
-- point of one server in a time range, history and not-yet-aggregated rows
-- alike, with the columns of the source's transient table.  Inlined by the
-- planner (so no SET clause): everything in it is schema-qualified.
CREATE FUNCTION pgfleet.metric_series(_module text)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    m pgfleet.metric_sources;
    base text := 'pgfleet.' || quote_ident(_module);
    tmp regclass;
    values_ text[];
BEGIN
    SELECT * INTO m FROM pgfleet.metric_sources WHERE module = _module;
    tmp := to_regclass(m.src_function || '_tmp');
    IF m.module IS NULL OR tmp IS NULL THEN
        RETURN;
    END IF;
    values_ := m.counters || m.deltas || m.gauges;
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$s_series(_srvid integer, _from timestamptz, _to timestamptz)
                      RETURNS TABLE (ts timestamptz%2$s%3$s)
                      LANGUAGE sql STABLE AS $s$
                        SELECT p.ts%4$s%5$s
                          FROM %1$s_history h, pg_catalog.unnest(h.points) AS p
                         WHERE h.srvid OPERATOR(pg_catalog.=) _srvid
                           AND h.ts_start OPERATOR(pg_catalog.<=) _to
                           AND h.ts_end OPERATOR(pg_catalog.>=) _from
                           AND p.ts OPERATOR(pg_catalog.>=) _from AND p.ts OPERATOR(pg_catalog.<=) _to
                        UNION ALL
                        SELECT c.ts%6$s%7$s FROM %1$s_current c
                         WHERE c.srvid OPERATOR(pg_catalog.=) _srvid
                           AND c.ts OPERATOR(pg_catalog.>=) _from AND c.ts OPERATOR(pg_catalog.<=) _to
                      $s$$f$,
                   base,
                   CASE WHEN m.keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, m.keys) END,
                   CASE WHEN values_ = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, values_) END,
                   pgfleet._list(m.keys, ', h.%I', ''), pgfleet._list(values_, ', p.%I', ''),
                   pgfleet._list(m.keys, ', c.%I', ''), pgfleet._list(values_, ', c.%I', ''));
END;
$body$;

-- As in 0002, with the path pinned here and in the functions it makes, the
-- series reader made by metric_series, and a query_source function named
-- with its schema (with the path pinned, a bare name finds nothing).
CREATE OR REPLACE FUNCTION pgfleet.create_metric_source(
    _module text, _src_function text,
    _keys text[], _counters text[], _deltas text[], _gauges text[], _onces text[],
    _epoch text DEFAULT NULL, _scope text DEFAULT NULL,
    _priority integer DEFAULT 10, _query_cleanup text DEFAULT NULL,
    _added_manually boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    tmp regclass;
    base text := 'pgfleet.' || quote_ident(_module);
    values_ text[] := _counters || _deltas || _gauges;
    missing text;
    c text;
    typ text;
BEGIN
    IF _module !~ '^[a-z_][a-z0-9_]*$' OR length(_module) > 40 THEN
        RAISE EXCEPTION 'invalid module name "%": use lower case letters, digits and _ (40 at most)', _module;
    END IF;
    IF cardinality(parse_ident(_src_function, false)) < 2 THEN
        RAISE EXCEPTION 'query_source function "%" has no schema: name it with its schema (public.% ...)',
                        _src_function, _src_function;
    END IF;
    tmp := (_src_function || '_tmp')::regclass;
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
    EXECUTE format('CREATE OR REPLACE FUNCTION %s_snapshot(_srvid integer) RETURNS void LANGUAGE plpgsql'
                   ' SET search_path = pg_catalog, pg_temp AS %L',
                   base, pgfleet.metric_snapshot_body(_module));
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s_aggregate(_srvid integer) RETURNS void
                      LANGUAGE sql SET search_path = pg_catalog, pg_temp
                      AS $w$SELECT pgfleet.metric_aggregate(%L, _srvid)$w$$f$, base, _module);
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s_purge(_srvid integer) RETURNS void
                      LANGUAGE sql SET search_path = pg_catalog, pg_temp
                      AS $w$SELECT pgfleet.metric_purge(%L, _srvid)$w$$f$, base, _module);
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %s_unregister(_srvid integer) RETURNS boolean
                      LANGUAGE sql SET search_path = pg_catalog, pg_temp
                      AS $w$DELETE FROM pgfleet.functions WHERE module = %L; SELECT true$w$$f$,
                   base, _module);
    PERFORM pgfleet.metric_series(_module);

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

-- As in 0005, with the path pinned here and in the snapshot function.
CREATE OR REPLACE FUNCTION pgfleet.metric_inline_rollup(_module text)
RETURNS void LANGUAGE plpgsql
SET client_min_messages = warning
SET search_path = pg_catalog, pg_temp AS $$
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
    EXECUTE format('CREATE OR REPLACE FUNCTION %s_snapshot(_srvid integer) RETURNS void LANGUAGE plpgsql'
                   ' SET search_path = pg_catalog, pg_temp AS %L',
                   base, pgfleet.metric_snapshot_body(_module));
END;
$$;

-- As in 0005, with the path pinned here and in the window totals' functions,
-- and <module>_sums, inlined, schema-qualified throughout.
CREATE OR REPLACE FUNCTION pgfleet.metric_extend(_module text)
RETURNS void LANGUAGE plpgsql
-- "already exists, skipping" for every column at every upgrade helps nobody.
SET client_min_messages = warning
SET search_path = pg_catalog, pg_temp AS $body$
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
                      RETURNS %1$s_point LANGUAGE sql IMMUTABLE PARALLEL SAFE
                      SET search_path = pg_catalog, pg_temp AS
                      $t$SELECT ROW(%2$s)::%1$s_point FROM unnest(_points) p$t$$f$,
                   base, format(agg_row, 'cardinality(_points)'));
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$s_chunks(_points %1$s_point[])
                      RETURNS %1$s_point[] LANGUAGE sql IMMUTABLE PARALLEL SAFE
                      SET search_path = pg_catalog, pg_temp AS
                      $t$SELECT array_agg(c ORDER BY g) FROM (
                             SELECT (p.ordinality - 1) / 10 AS g, ROW(%2$s)::%1$s_point AS c
                               FROM unnest(_points) WITH ORDINALITY p GROUP BY 1) s$t$$f$,
                   base, format(agg_row, 'max(p.ordinality)'));
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$s_chunk_ts(_points %1$s_point[])
                      RETURNS timestamptz[] LANGUAGE sql IMMUTABLE PARALLEL SAFE
                      SET search_path = pg_catalog, pg_temp AS
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
    -- A plain SQL function, inlined by the planner: no SET clause, every
    -- name in it schema-qualified.  ROWS FROM (unnest(a), unnest(b)) is what
    -- unnest(a, b) stands for.
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
                             WHERE h.srvid OPERATOR(pg_catalog.=) _srvid
                               AND h.ts_start OPERATOR(pg_catalog.>=) _from
                               AND h.ts_end OPERATOR(pg_catalog.<=) _to
                            UNION ALL
                            SELECT %3$s %5$s
                              FROM %1$s_history h,
                                   ROWS FROM (pg_catalog.unnest(h.chunk_ts), pg_catalog.unnest(h.chunks))
                                     AS c(first_ts, ts, %8$s)
                             WHERE h.srvid OPERATOR(pg_catalog.=) _srvid
                               AND h.ts_start OPERATOR(pg_catalog.<=) _to
                               AND h.ts_end OPERATOR(pg_catalog.>=) _from
                               AND (h.ts_start OPERATOR(pg_catalog.<) _from
                                    OR h.ts_end OPERATOR(pg_catalog.>) _to)
                               AND c.first_ts OPERATOR(pg_catalog.>=) _from
                               AND c.ts OPERATOR(pg_catalog.<=) _to
                            UNION ALL
                            SELECT %3$s %6$s
                              FROM %1$s_history h,
                                   ROWS FROM (pg_catalog.unnest(h.chunk_ts), pg_catalog.unnest(h.chunks))
                                     WITH ORDINALITY AS c(first_ts, ts, %8$s, o),
                                   pg_catalog.unnest(h.points[((c.o OPERATOR(pg_catalog.-) 1)
                                                                 OPERATOR(pg_catalog.*) 10)
                                                                OPERATOR(pg_catalog.+) 1
                                                              : c.o OPERATOR(pg_catalog.*) 10]) AS p
                             WHERE h.srvid OPERATOR(pg_catalog.=) _srvid
                               AND h.ts_start OPERATOR(pg_catalog.<=) _to
                               AND h.ts_end OPERATOR(pg_catalog.>=) _from
                               AND (h.ts_start OPERATOR(pg_catalog.<) _from
                                    OR h.ts_end OPERATOR(pg_catalog.>) _to)
                               AND c.ts OPERATOR(pg_catalog.>=) _from
                               AND c.first_ts OPERATOR(pg_catalog.<=) _to
                               AND (c.first_ts OPERATOR(pg_catalog.<) _from
                                    OR c.ts OPERATOR(pg_catalog.>) _to)
                               AND p.ts OPERATOR(pg_catalog.>=) _from
                               AND p.ts OPERATOR(pg_catalog.<=) _to
                            UNION ALL
                            SELECT %7$s FROM %1$s_current c
                             WHERE c.srvid OPERATOR(pg_catalog.=) _srvid
                               AND c.ts OPERATOR(pg_catalog.>=) _from
                               AND c.ts OPERATOR(pg_catalog.<=) _to
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

-- The functions the migrations define and this one does not redefine.
ALTER FUNCTION pgfleet._coldefs(regclass, text[], boolean) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet._list(text[], text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet._tmp_table(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.collector_command(text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.collector_leave(text, integer[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.grant_admin() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.lease_held(integer, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.lease_release(text, integer[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.lease_round(text, text, integer, interval, integer[])
    SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.metric_aggregate(text, integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.metric_extend_trigger() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.metric_forget(text, integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.metric_partition(text, date) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.metric_purge(text, integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.metric_rollup_rebuild(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.metric_snapshot_body(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.record_error(integer, text, text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.run_operation(integer, text, text[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.snapshot_lock() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.snapshot_try_lock() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.take_snapshot(integer, text[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgfleet.unregister_module(text) SET search_path = pg_catalog, pg_temp;

-- The functions of the sources that exist, made again (the built-in ones
-- are made again after the migrations anyway, users' are not).
SELECT pgfleet.metric_series(module), pgfleet.metric_extend(module) FROM pgfleet.metric_sources;

-- Whatever else is in schema pgfleet (a source's _aggregate, _purge,
-- _unregister, _src...; a user's own function), except the inlined readers.
-- A function owned by a role we are not a member of is left as it is, and
-- said so.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure AS fn, p.proowner
          FROM pg_proc p
         WHERE p.pronamespace = 'pgfleet'::regnamespace
           AND p.prokind IN ('f', 'p')
           AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) s WHERE s LIKE 'search\_path=%')
           AND NOT EXISTS (SELECT 1 FROM pgfleet.metric_sources m
                            WHERE p.proname IN (m.module || '_series', m.module || '_sums'))
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e')
    LOOP
        IF pg_has_role(f.proowner, 'USAGE') THEN
            EXECUTE format('ALTER ROUTINE %s SET search_path = pg_catalog, pg_temp', f.fn);
        ELSE
            RAISE WARNING 'function % is not ours: its search_path is left unset', f.fn;
        END IF;
    END LOOP;
END;
$$;

SELECT pg_catalog.set_config('search_path',
                             pg_catalog.current_setting('pgfleet.migrating_search_path'), true);

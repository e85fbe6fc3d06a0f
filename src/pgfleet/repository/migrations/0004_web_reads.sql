-- What the web UI reads, made cheap, and who may read it.
--
-- 1. Window totals.  Every <module>_history row gains a stored generated
--    column "total", a <module>_point holding the sum of the window's counter
--    and delta values (and the gauges' values at the window's end).  A sum
--    over a range then reads the totals of the windows the range covers
--    whole and unnests the points of the (at most two per key) edge windows
--    only: a week of 2,000 statements is 40,000 totals instead of 4 million
--    points.  <module>_sums(srvid, from, to) does exactly that; group its rows
--    by key and sum() them.  <module>_series is unchanged.
--
-- 2. Rollups.  A chart of a whole server (queries/s over a week) needs every
--    snapshot but not every entry: <module>_rollup keeps, per snapshot, the
--    counters and deltas summed per a few keys (pg_stat_statements per
--    database...), and optionally gauges summed over the live entries
--    (sessions per state).  A statement-level trigger on <module>_current
--    writes them as snapshots arrive and drops what the server's retention no
--    longer covers.  pgfleet.metric_rollups says which sources have one.
--
-- Both are added by pgfleet.metric_extend(module), which runs here for the
-- sources that exist and, for sources created or changed later (the built-in
-- ones are installed after the migrations, user sources at any time), from a
-- deferred trigger on pgfleet.metric_sources at commit.  Idempotent.
--
-- 3. Roles.  pgfleet_read may read everything in schema pgfleet (enough to
--    browse the UI); pgfleet_admin may also command the collector.  Both are
--    created when missing and the migrating role may create roles; otherwise
--    an administrator creates them (see docs/web.md) and reruns the grants.

CREATE TABLE pgfleet.metric_rollups (
    module text PRIMARY KEY,
    -- the keys kept in the rollup; the others are summed over
    keys text[] NOT NULL DEFAULT '{}',
    -- gauges summed over the live entries at each snapshot (in _last)
    gauges text[] NOT NULL DEFAULT '{}'
);

INSERT INTO pgfleet.metric_rollups (module, keys, gauges) VALUES
    ('pg_stat_statements', '{datname}', '{}'),
    ('pg_stat_kcache', '{datname}', '{}'),
    ('pg_stat_activity', '{datname,state,wait_event_type}', '{count}'),
    ('pg_wait_sampling', '{event_type,event}', '{}'),
    ('pg_stat_io', '{}', '{}'),
    ('pg_stat_user_tables', '{datname}', '{}'),
    ('pg_stat_user_indexes', '{datname}', '{}');

CREATE FUNCTION pgfleet.metric_extend(_module text)
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
    sumdefs := pgfleet._list(summed, ', nullif(sum(n.%1$I), 0)', '');
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %1$s_rollup_add() RETURNS trigger
                      LANGUAGE plpgsql AS $t$
DECLARE
    s record;
BEGIN
    %2$s
    FOR s IN SELECT n.srvid, max(n.ts) AS ts FROM new_rows n GROUP BY n.srvid LOOP
        %3$s
        DELETE FROM %1$s_rollup o USING pgfleet.servers v
         WHERE o.srvid = s.srvid AND v.srvid = s.srvid AND o.ts < s.ts - v.retention;
    END LOOP;
    RETURN NULL;
END;
$t$$f$,
        base,
        CASE WHEN summed = '{}' THEN '' ELSE format(
            'INSERT INTO %1$s_rollup (srvid, %2$s ts %3$s) SELECT n.srvid, %4$s n.ts %5$s'
            ' FROM new_rows n GROUP BY n.srvid, %4$s n.ts;',
            base, pgfleet._list(r.keys, '%I, ', ''), pgfleet._list(summed, ', %I', ''),
            pgfleet._list(r.keys, 'n.%I, ', ''), sumdefs) END,
        CASE WHEN r.gauges = '{}' THEN '' ELSE format(
            'INSERT INTO %1$s_rollup (srvid, %2$s ts %3$s) SELECT s.srvid, %4$s s.ts %5$s'
            ' FROM %1$s_last l WHERE l.srvid = s.srvid GROUP BY %6$s;',
            base, pgfleet._list(r.keys, '%I, ', ''), pgfleet._list(r.gauges, ', %I', ''),
            pgfleet._list(r.keys, 'l.%I, ', ''), pgfleet._list(r.gauges, ', sum(l.%1$I)', ''),
            CASE WHEN r.keys = '{}' THEN 'l.srvid' ELSE pgfleet._list(r.keys, 'l.%I') END) END);
    EXECUTE format('DROP TRIGGER IF EXISTS rollup_add ON %s_current', base);
    EXECUTE format('CREATE TRIGGER rollup_add AFTER INSERT ON %1$s_current'
                   ' REFERENCING NEW TABLE AS new_rows'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION %1$s_rollup_add()', base);
END;
$body$;

-- Sources created or re-registered later (every "repo upgrade" re-registers
-- the built-in ones, after the migrations) are extended when the transaction
-- commits, once their tables exist.
CREATE FUNCTION pgfleet.metric_extend_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgfleet.metric_extend(NEW.module);
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER metric_extend AFTER INSERT OR UPDATE ON pgfleet.metric_sources
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION pgfleet.metric_extend_trigger();

-- (Re)build a source's rollup from the points kept, for every server:
-- counters and deltas only (gauges were kept as changes, their sums over the
-- live entries can't be rebuilt).  Used once on upgrade, and by benchmarks.
CREATE FUNCTION pgfleet.metric_rollup_rebuild(_module text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    m pgfleet.metric_sources;
    r pgfleet.metric_rollups;
    base text := 'pgfleet.' || quote_ident(_module);
    summed text[];
BEGIN
    SELECT * INTO m FROM pgfleet.metric_sources WHERE module = _module;
    SELECT * INTO r FROM pgfleet.metric_rollups WHERE module = _module;
    summed := m.counters || m.deltas;
    IF m.module IS NULL OR r.module IS NULL OR summed = '{}' THEN
        RETURN;
    END IF;
    EXECUTE format('DELETE FROM %s_rollup', base);
    EXECUTE format($q$
        INSERT INTO %1$s_rollup (srvid, %2$s ts %3$s)
        SELECT v.srvid, %4$s s.ts %5$s
          FROM pgfleet.servers v, %1$s_series(v.srvid, '-infinity', 'infinity') s
         GROUP BY v.srvid, %4$s s.ts$q$,
        base, pgfleet._list(r.keys, '%I, ', ''), pgfleet._list(summed, ', %I', ''),
        pgfleet._list(r.keys, 's.%I, ', ''),
        pgfleet._list(summed, ', nullif(sum(s.%1$I), 0)', ''));
END;
$$;

-- The sources of an existing repository.
SELECT pgfleet.metric_extend(module), pgfleet.metric_rollup_rebuild(module)
  FROM pgfleet.metric_sources;

-- Roles: readers browse, admins also command the collector.
DO $$
DECLARE
    can_create boolean := (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user);
    missing text[] := ARRAY(SELECT r FROM unnest(ARRAY['pgfleet_read', 'pgfleet_admin']) r
                             WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r));
    r text;
BEGIN
    IF missing <> '{}' AND NOT can_create THEN
        RAISE NOTICE 'roles % do not exist and % may not create them: see docs/web.md',
                     missing, current_user;
    ELSE
        FOREACH r IN ARRAY missing LOOP
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END LOOP;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgfleet_read') THEN
        GRANT USAGE ON SCHEMA pgfleet TO pgfleet_read;
        GRANT SELECT ON ALL TABLES IN SCHEMA pgfleet TO pgfleet_read;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgfleet TO pgfleet_read;
        -- Tables created later by the same (owning) role: new sources, rollups.
        ALTER DEFAULT PRIVILEGES IN SCHEMA pgfleet GRANT SELECT ON TABLES TO pgfleet_read;
        -- Who commanded the collectors, and what they answered, is for admins.
        IF to_regclass('pgfleet.collector_requests') IS NOT NULL THEN
            REVOKE ALL ON pgfleet.collector_requests, pgfleet.collector_replies FROM pgfleet_read;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgfleet_admin')
           AND NOT pg_has_role('pgfleet_admin', 'pgfleet_read', 'MEMBER') THEN
            GRANT pgfleet_read TO pgfleet_admin;
        END IF;
    END IF;
END;
$$;

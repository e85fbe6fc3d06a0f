-- Compact history.  Until now an aggregation window of an entry was one row
-- holding an array of <m>_point composites (a 24-byte header, a null bitmap
-- and 8 bytes per value for each point), its window total and chunk totals
-- (two more copies of the same values), the entry's keys as text and, for
-- each point, its timestamp: ~150 bytes per statement-point at coalesce 5.
--
-- Now, per source <m>:
--
--   <m>_keys     (keyid, srvid, keys...): an entry's keys, once.  The history
--                names an entry by its keyid (8 bytes) instead of its keys.
--   <m>_windows  (srvid, ts_start, ts[]): the snapshot times of one
--                aggregation window of one server, once: every entry that
--                changed in it shares them.
--   <m>_history  (keyid, ts_start, ts_end, srvid, at, t, v), partitioned by
--                day of ts_start (the window's start) as before:
--                  at  a bit per snapshot of the window, set where the entry
--                      changed (unchanged entries have no row, no bit);
--                  v   the values, column by column ("1,2,,3;...;0.25"):
--                      each column's values of the set bits in order, ','
--                      between them, ';' between columns, an empty value for
--                      NULL (a zero delta), an empty column when it is NULL
--                      throughout, trailing empty columns left out.  Text
--                      because SQL reads it back with string_to_array() and a
--                      cast (no per-column array header, small integers are
--                      one or two bytes), and because the output of a number
--                      reads back to exactly the same value;
--                  t   the window's totals in the same form (sums of counters
--                      and deltas, gauges as at the last point), kept for
--                      windows of more than 5 points only: the readers of
--                      whole windows use them, and below that decoding the
--                      points costs about what reading the totals does.
--                t and v stay in the row, compressed (lz4 where the server
--                has it) when the row passes ~2 kB, as in long windows.
--
-- The series and sums readers decode the rows; nothing else changes for
-- their callers.  The old history becomes <m>_history_v1 (its partitions
-- <m>_v1_YYYYMMDD), which the readers still read, and which
-- pgfleet.metric_convert() moves into the new form in batches, each its own
-- short transaction (`pgfleet repo upgrade` runs them after the migration),
-- dropping it once empty.
--
-- Values are written as text under pinned settings (DateStyle ISO,
-- IntervalStyle postgres, extra_float_digits 1: the shortest text that reads
-- back to the same float): what a reader's session settings are does not
-- change what it reads back.  Text of other types than numbers, times and
-- the like may hold ',' or ';': it is escaped, '%' -> %25, ',' -> %2C,
-- ';' -> %3B, and the empty string is %00.

-- History keys: the columns that name an entry in the history, the keys
-- unless a source says otherwise.  pg_qualstats has an entry per predicate
-- and constant on the server (keys: its delta base in <m>_last is right
-- whatever constants the extension evicts), but its history is per
-- predicate: constants come and go by the thousand, and an entry per
-- constant in the history (and its keys and texts) made it the largest
-- source of a repository.  A source whose history keys differ has counters
-- and deltas only, summed per history key; its history keys may be keys or
-- once-columns (once-columns then stay with the history key, from the first
-- entry seen).
ALTER TABLE pgfleet.metric_sources ADD COLUMN history_keys text[];
COMMENT ON COLUMN pgfleet.metric_sources.history_keys IS
    'columns naming an entry in <m>_current, _keys, _history, _once and the readers; NULL: keys';

CREATE FUNCTION pgfleet._hkeys(m pgfleet.metric_sources) RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(m.history_keys, m.keys)
$fn$;

CREATE TABLE pgfleet.history_usage (
    srvid integer NOT NULL,
    module text NOT NULL,
    day date NOT NULL,
    rows bigint NOT NULL DEFAULT 0,
    points bigint NOT NULL DEFAULT 0,
    first_ts timestamptz NOT NULL,
    last_ts timestamptz NOT NULL,
    PRIMARY KEY (srvid, module, day)
);
COMMENT ON TABLE pgfleet.history_usage IS
    'history rows and points written per server, source and day (UTC) of window start: '
    'pgfleet repo size splits each day partition''s bytes between servers by points';

-- Types whose text never holds ',' or ';' nor is empty: written as they
-- print, read back with a cast (of the whole array, in the readers).
CREATE FUNCTION pgfleet._plain(_type regtype) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT _type IN ('smallint', 'integer', 'bigint', 'real', 'double precision',
                     'numeric', 'boolean', 'timestamptz', 'timestamp', 'date',
                     'interval', 'oid', 'pg_lsn', 'xid', 'inet', 'cidr', 'uuid')
$fn$;

-- A column's value as it is written into v and t: text, escaped for types
-- whose text may hold the separators.
CREATE FUNCTION pgfleet._enc(_expr text, _type regtype) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN pgfleet._plain(_type) THEN format('(%s)::text', _expr)
                ELSE format($e$(CASE WHEN (%1$s)::text OPERATOR(pg_catalog.=) '' THEN '%%00'
                                     ELSE pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
                                              (%1$s)::text, '%%', '%%25'), ',', '%%2C'), ';', '%%3B') END)$e$,
                            _expr) END
$fn$;

-- A type's name with its schema: the readers run with their caller's
-- search_path, where another schema's "text" may come first.
CREATE FUNCTION pgfleet._qualtype(_type regtype) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT format('%I.%I', n.nspname, t.typname)
      FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = _type
$fn$;

-- The reverse, for an element already split out (NULL for an empty one):
-- fully qualified, as it goes into the inlined readers.
CREATE FUNCTION pgfleet._dec(_expr text, _type regtype) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN pgfleet._plain(_type) THEN format('(%s)::%s', _expr, pgfleet._qualtype(_type))
                ELSE format($e$(CASE WHEN (%1$s) OPERATOR(pg_catalog.=) '%%00' THEN ''
                                     ELSE pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
                                              %1$s, '%%2C', ','), '%%3B', ';'), '%%25', '%%') END)::%2$s$e$,
                            _expr, pgfleet._qualtype(_type)) END
$fn$;

-- The readers' array of column _i of a row (x.c, v split at ';'): of its
-- type when plain (cast once per row, read per point at no cost), else text
-- (decoded per point).
CREATE FUNCTION pgfleet._arr(_i integer, _type regtype) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT format($x$pg_catalog.string_to_array(x.c[%1$s], ',', '')%2$s AS a%1$s$x$, _i,
                  CASE WHEN pgfleet._plain(_type) THEN format('::%s[]', pgfleet._qualtype(_type)) ELSE '' END)
$fn$;

-- An element of such an array, as the column's value.
CREATE FUNCTION pgfleet._elem(_expr text, _type regtype) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN pgfleet._plain(_type) THEN _expr ELSE pgfleet._dec(_expr, _type) END
$fn$;

-- A column of v (or t): every value of the group in ts order, or '' when all
-- are NULL.
CREATE FUNCTION pgfleet._enc_col(_col text, _type regtype) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT format($e$CASE WHEN pg_catalog.count(p.%1$I) = 0 THEN ''
                          ELSE pg_catalog.string_agg(coalesce(%2$s, ''), ',' ORDER BY p.ts) END$e$,
                  _col, pgfleet._enc(format('p.%I', _col), _type))
$fn$;

-- The value columns of a source, in the order v holds them: its point
-- type's attributes after ts (a column added later comes last).
CREATE FUNCTION pgfleet.metric_columns(_module text, OUT cols text[], OUT types regtype[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}'),
           coalesce(array_agg(a.atttypid::regtype ORDER BY a.attnum), '{}')
      FROM pg_attribute a
     WHERE a.attrelid = (SELECT typrelid FROM pg_type
                          WHERE oid = to_regtype('pgfleet.' || quote_ident(_module || '_point')))
       AND a.attnum > 1 AND NOT a.attisdropped
$fn$;

-- The tables of the compact history of a source (idempotent).
CREATE FUNCTION pgfleet.metric_storage(_module text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $fn$
DECLARE
    m pgfleet.metric_sources;
    base text := 'pgfleet.' || quote_ident(_module);
    tmp regclass;
    c text;
    typ text;
    hk text[];
    written boolean;
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    hk := pgfleet._hkeys(m);
    tmp := (m.src_function || '_tmp')::regclass;
    IF (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a
         WHERE a.attrelid = to_regclass(base || '_keys') AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname NOT IN ('keyid', 'srvid'))
       IS DISTINCT FROM (SELECT array_agg(x ORDER BY x) FROM unnest(hk) x)
       AND to_regclass(base || '_keys') IS NOT NULL THEN
        -- The history keys changed: fine while nothing was written with them.
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s_keys)', base) INTO written;
        IF written THEN
            RAISE EXCEPTION 'the history keys of source "%" cannot change: it has history', _module;
        END IF;
        EXECUTE format('DROP TABLE %s_keys', base);
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s_keys (keyid bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,'
                   ' srvid integer NOT NULL%s)',
                   base, CASE WHEN hk = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, hk) END);
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS %I ON %s_keys (srvid%s)',
                   _module || '_keys_srvid', base, pgfleet._list(hk, ', %I', ''));
    FOREACH c IN ARRAY hk LOOP
        SELECT format_type(atttypid, atttypmod) INTO typ FROM pg_attribute WHERE attrelid = tmp AND attname = c;
        EXECUTE format('ALTER TABLE %s_keys ADD COLUMN IF NOT EXISTS %I %s', base, c, typ);
    END LOOP;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s_windows (srvid integer NOT NULL, ts_start timestamptz NOT NULL,'
                   ' ts timestamptz[] NOT NULL, PRIMARY KEY (srvid, ts_start))', base);
    IF to_regclass(base || '_history') IS NULL THEN
        -- Fixed-width columns first: no alignment padding between them.
        EXECUTE format('CREATE TABLE %s_history (keyid bigint NOT NULL, ts_start timestamptz NOT NULL,'
                       ' ts_end timestamptz NOT NULL, srvid integer NOT NULL, at bit varying NOT NULL,'
                       ' t text, v text NOT NULL) PARTITION BY RANGE (ts_start)', base);
        EXECUTE format('CREATE INDEX %I ON %s_history (srvid, keyid, ts_start)', _module || '_history_key', base);
    END IF;
END;
$fn$;

-- A day partition of the history.
CREATE OR REPLACE FUNCTION pgfleet.metric_partition(_module text, _day date) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    part text := format('%s_history_%s', _module, to_char(_day, 'YYYYMMDD'));
BEGIN
    IF to_regclass('pgfleet.' || quote_ident(part)) IS NULL THEN
        -- Bounds in UTC, whatever the session's TimeZone.  t and v stay in
        -- the row (MAIN): PostgreSQL compresses a row's values once it passes
        -- ~2 kB (the rows of long windows), and a reader reads them with the
        -- row rather than from a TOAST table, index lookup and all.
        EXECUTE format('CREATE TABLE pgfleet.%I PARTITION OF pgfleet.%I FOR VALUES FROM (%L) TO (%L)',
                       part, _module || '_history',
                       (_day::timestamp AT TIME ZONE 'UTC'),
                       ((_day + 1)::timestamp AT TIME ZONE 'UTC'));
        EXECUTE format('ALTER TABLE pgfleet.%I ALTER COLUMN v SET STORAGE MAIN, ALTER COLUMN t SET STORAGE MAIN', part);
        IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
            EXECUTE format('ALTER TABLE pgfleet.%I ALTER COLUMN v SET COMPRESSION lz4, ALTER COLUMN t SET COMPRESSION lz4', part);
        END IF;
    END IF;
END;
$fn$;

-- The INSERT of the history keys of _src (a relation or a parenthesised
-- SELECT with srvid and the history keys) that <m>_keys lacks.  Keys are
-- NOT NULL (they are <m>_last's primary key) but once-columns that are
-- history keys may be NULL, which a unique index does not match (and NULLS
-- NOT DISTINCT needs PostgreSQL 15): those are looked up NULL-safely.
CREATE FUNCTION pgfleet.metric_keys_sql(_module text, _src text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    m pgfleet.metric_sources;
    hk text[];
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    hk := pgfleet._hkeys(m);
    IF hk <@ m.keys THEN
        -- Most keys are known already: the anti-join finds the new ones
        -- without a speculative insertion per row (ON CONFLICT stays for a
        -- concurrent conversion).
        RETURN format('INSERT INTO pgfleet.%1$I (srvid %2$s) SELECT DISTINCT srvid %2$s FROM %3$s s'
                      ' WHERE NOT EXISTS (SELECT 1 FROM pgfleet.%1$I k WHERE k.srvid = s.srvid %4$s)'
                      ' ON CONFLICT DO NOTHING',
                      _module || '_keys', pgfleet._list(hk, ', %I', ''), _src,
                      pgfleet._list(hk, ' AND k.%1$I = s.%1$I', ''));
    END IF;
    RETURN format('INSERT INTO pgfleet.%1$I (srvid %2$s) SELECT DISTINCT srvid %2$s FROM %3$s s'
                  ' WHERE NOT EXISTS (SELECT 1 FROM pgfleet.%1$I k WHERE k.srvid = s.srvid %4$s)',
                  _module || '_keys', pgfleet._list(hk, ', %I', ''), _src,
                  pgfleet._list(hk, ' AND k.%1$I IS NOT DISTINCT FROM s.%1$I', ''));
END;
$fn$;

-- The SELECT that packs point rows into history rows.  _src is a relation
-- (a CTE's name) with the source's keys and value columns, srvid, ts, and
-- w_start/w_ts: the window's start and its snapshot times.  Its rows must
-- belong to one server, and keys must already be in <m>_keys.
CREATE FUNCTION pgfleet.metric_pack_sql(_module text, _src text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    m pgfleet.metric_sources;
    base text := 'pgfleet.' || quote_ident(_module);
    mc record;
    tot text[] := '{}';
    i integer;
    hk text[];
    src text := _src;
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    hk := pgfleet._hkeys(m);
    SELECT * INTO mc FROM pgfleet.metric_columns(_module);
    IF hk <> m.keys THEN
        -- Entries sharing a history key: one point per key and time.
        src := format('(SELECT srvid, ts, w_start, w_ts%1$s%2$s FROM %3$s GROUP BY srvid, ts, w_start, w_ts%1$s)',
                      pgfleet._list(hk, ', %I', ''),
                      pgfleet._list(mc.cols, ', nullif(sum(%1$I), 0) AS %1$I', ''), _src);
    END IF;
    FOR i IN 1 .. coalesce(array_length(mc.cols, 1), 0) LOOP
        -- A gauge's total is its last value, taken as text: array_agg() of
        -- an array-typed column would make a 2-D array (and refuse NULLs).
        tot := tot || format('coalesce(%s, '''')',
            CASE WHEN mc.cols[i] = ANY (m.counters || m.deltas)
                 THEN pgfleet._enc(format('nullif(sum(p.%I), 0)::%s', mc.cols[i], format_type(mc.types[i], NULL)), mc.types[i])
                 ELSE format('(array_agg(%s ORDER BY p.ts DESC))[1]', pgfleet._enc(format('p.%I', mc.cols[i]), mc.types[i])) END);
    END LOOP;
    RETURN format($q$
        SELECT k.keyid, p.w_start, max(p.ts), min(p.srvid),
               bit_or((lpad('1', array_position(p.w_ts, p.ts), '0')
                       || repeat('0', cardinality(p.w_ts) - array_position(p.w_ts, p.ts)))::varbit),
               CASE WHEN count(*) > 5 THEN rtrim(concat_ws(';', %1$s), ';') END,
               rtrim(concat_ws(';', %2$s), ';')
          FROM %3$s p JOIN %4$s_keys k ON k.srvid = p.srvid %5$s
         GROUP BY k.keyid, p.w_start$q$,
        CASE WHEN tot = '{}' THEN '''''' ELSE array_to_string(tot, ', ') END,
        CASE WHEN mc.cols = '{}' THEN ''''''
             ELSE (SELECT string_agg(pgfleet._enc_col(c, t), ', ' ORDER BY o)
                     FROM unnest(mc.cols, mc.types) WITH ORDINALITY AS u(c, t, o)) END,
        src, base,
        (SELECT string_agg(format(CASE WHEN c = ANY (m.keys) THEN ' AND k.%1$I = p.%1$I'
                                       ELSE ' AND k.%1$I IS NOT DISTINCT FROM p.%1$I' END, c), '' ORDER BY o)
           FROM unnest(hk) WITH ORDINALITY AS u(c, o)));
END;
$fn$;

-- Aggregation: every point of a server waiting in <m>_current becomes one
-- window, one history row per entry that changed in it.  A few statements
-- for the whole source, whatever its number of entries.
CREATE OR REPLACE FUNCTION pgfleet.metric_aggregate(_module text, _srvid integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET datestyle = 'ISO, YMD' SET intervalstyle = postgres
SET extra_float_digits = 1 AS $fn$
DECLARE
    m pgfleet.metric_sources;
    base text := 'pgfleet.' || quote_ident(_module);
    w_start timestamptz;
    w_ts timestamptz[];
    nrows bigint;
    npoints bigint;
    last_ts timestamptz;
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    EXECUTE format('SELECT min(ts), array_agg(DISTINCT ts ORDER BY ts) FROM %s_current WHERE srvid = $1', base)
       INTO w_start, w_ts USING _srvid;
    IF w_start IS NULL THEN
        RETURN;
    END IF;
    -- A window is named by its start.  Two windows of a server cannot start
    -- at the same time unless a snapshot older than the last window arrived
    -- after it (a collector's spool drained late): that one starts a
    -- microsecond earlier, which still precedes each of its points.
    LOOP
        EXECUTE format('INSERT INTO %s_windows (srvid, ts_start, ts) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING', base)
          USING _srvid, w_start, w_ts;
        EXIT WHEN FOUND;
        w_start := w_start - interval '1 microsecond';
    END LOOP;
    PERFORM pgfleet.metric_partition(_module, (w_start AT TIME ZONE 'UTC')::date);
    EXECUTE pgfleet.metric_keys_sql(_module, format('(SELECT * FROM %s_current WHERE srvid = $1)', base))
      USING _srvid;
    EXECUTE format($q$
        WITH moved AS (DELETE FROM %1$s_current WHERE srvid = $1 RETURNING *),
             pts AS (SELECT moved.*, $2::timestamptz AS w_start, $3::timestamptz[] AS w_ts FROM moved),
             ins AS (INSERT INTO %1$s_history (keyid, ts_start, ts_end, srvid, at, t, v) %2$s
                     RETURNING length(at::text) - length(replace(at::text, '1', '')) AS n, ts_end)
        SELECT count(*), sum(n), max(ts_end) FROM ins$q$,
        base, pgfleet.metric_pack_sql(_module, 'pts'))
      INTO nrows, npoints, last_ts USING _srvid, w_start, w_ts;
    INSERT INTO pgfleet.history_usage AS u (srvid, module, day, rows, points, first_ts, last_ts)
    VALUES (_srvid, _module, (w_start AT TIME ZONE 'UTC')::date, nrows, coalesce(npoints, 0), w_start,
            coalesce(last_ts, w_start))
    ON CONFLICT (srvid, module, day) DO UPDATE
       SET rows = u.rows + excluded.rows, points = u.points + excluded.points,
           first_ts = least(u.first_ts, excluded.first_ts), last_ts = greatest(u.last_ts, excluded.last_ts);
END;
$fn$;

-- One batch of the conversion of the old history (<m>_history_v1): the
-- oldest rows of one server in its oldest partition, about _limit of them
-- (never splitting rows that start at the same time).  Old rows of one
-- aggregation overlap in time; a window is the union of overlapping rows.
-- Returns the rows converted; 0 once nothing is left, after dropping the old
-- table and making the readers again without it.
CREATE FUNCTION pgfleet.metric_convert(_module text, _limit integer DEFAULT 5000) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET datestyle = 'ISO, YMD' SET intervalstyle = postgres
SET extra_float_digits = 1 SET client_min_messages = warning AS $fn$
DECLARE
    m pgfleet.metric_sources;
    base text := 'pgfleet.' || quote_ident(_module);
    old regclass;
    part regclass;
    srv integer;
    upto timestamptz;
    mc record;
    n bigint := 0;
    r record;
    hk text[];
    extra text[];   -- history keys the old rows lack: once-columns, from <m>_once_v1
    rows_ text;
BEGIN
    -- The lock aggregation takes: a batch and an aggregation never make the
    -- same day partition at once, and two conversions take turns.
    PERFORM pgfleet.snapshot_lock();
    old := to_regclass('pgfleet.' || quote_ident(_module || '_history_v1'));
    SELECT * INTO m FROM pgfleet.metric_sources WHERE module = _module;
    IF old IS NULL OR m.module IS NULL THEN
        RETURN 0;
    END IF;
    hk := pgfleet._hkeys(m);
    extra := ARRAY(SELECT c FROM unnest(hk) c WHERE c <> ALL (m.keys));
    SELECT * INTO mc FROM pgfleet.metric_columns(_module);
    FOR part IN
        SELECT c.oid::regclass FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = old
         ORDER BY (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\)'))[1]::timestamptz
    LOOP
        EXECUTE format('SELECT srvid FROM %s LIMIT 1', part) INTO srv;
        IF srv IS NULL THEN
            EXECUTE format('DROP TABLE %s', part);
            CONTINUE;
        END IF;
        EXECUTE format('SELECT ts_start FROM %s WHERE srvid = $1 ORDER BY ts_start OFFSET $2 LIMIT 1', part)
           INTO upto USING srv, greatest(_limit, 1) - 1;
        upto := coalesce(upto, 'infinity');
        -- The batch's rows with their history keys.
        rows_ := format('(SELECT h.*%s FROM %s h%s WHERE h.srvid = $1 AND h.ts_start <= $2)',
                        pgfleet._list(extra, ', o.%I', ''), part,
                        CASE WHEN extra = '{}' THEN ''
                             ELSE format(' LEFT JOIN %s_once_v1 o ON o.srvid = h.srvid%s', base,
                                         pgfleet._list(m.keys, ' AND o.%1$I = h.%1$I', '')) END);
        EXECUTE pgfleet.metric_keys_sql(_module, rows_) USING srv, upto;
        -- The partitions of the windows about to be written: a window starts
        -- at its first row's start, inside this old partition's day.
        FOR r IN EXECUTE format('SELECT DISTINCT (ts_start AT TIME ZONE ''UTC'')::date AS d FROM %s WHERE srvid = $1 AND ts_start <= $2', part)
                 USING srv, upto
        LOOP
            PERFORM pgfleet.metric_partition(_module, r.d);
        END LOOP;
        EXECUTE format($q$
            WITH gone AS (DELETE FROM %1$s WHERE srvid = $1 AND ts_start <= $2 RETURNING *),
                 moved AS (SELECT h.*%5$s FROM gone h%6$s),
                 edges AS (SELECT mv.*, max(ts_end) OVER (ORDER BY ts_start, ts_end ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
                             FROM moved mv),
                 grouped AS (SELECT e.*, count(*) FILTER (WHERE e.before IS NULL OR e.ts_start > e.before)
                                         OVER (ORDER BY e.ts_start, e.ts_end ROWS UNBOUNDED PRECEDING) AS g
                               FROM edges e),
                 flat AS (SELECT g.srvid, g.g %2$s, pt.* FROM grouped g, unnest(g.points) pt),
                 win AS (SELECT g, min(ts) AS w_start, array_agg(DISTINCT ts ORDER BY ts) AS w_ts FROM flat GROUP BY g),
                 wins AS (INSERT INTO %3$s_windows (srvid, ts_start, ts) SELECT $1, w_start, w_ts FROM win),
                 pts AS (SELECT f.*, w.w_start, w.w_ts FROM flat f JOIN win w USING (g)),
                 ins AS (INSERT INTO %3$s_history (keyid, ts_start, ts_end, srvid, at, t, v) %4$s
                         RETURNING length(at::text) - length(replace(at::text, '1', '')) AS n, ts_start, ts_end),
                 usage AS (INSERT INTO pgfleet.history_usage AS u (srvid, module, day, rows, points, first_ts, last_ts)
                           SELECT $1, $3, (ts_start AT TIME ZONE 'UTC')::date, count(*), sum(n), min(ts_start), max(ts_end)
                             FROM ins GROUP BY 3
                           ON CONFLICT (srvid, module, day) DO UPDATE
                              SET rows = u.rows + excluded.rows, points = u.points + excluded.points,
                                  first_ts = least(u.first_ts, excluded.first_ts),
                                  last_ts = greatest(u.last_ts, excluded.last_ts))
            SELECT count(*) FROM moved$q$,
            part, pgfleet._list(hk, ', g.%I', ''), base, pgfleet.metric_pack_sql(_module, 'pts'),
            pgfleet._list(extra, ', o.%I', ''),
            CASE WHEN extra = '{}' THEN ''
                 ELSE format(' LEFT JOIN %s_once_v1 o ON o.srvid = h.srvid%s', base,
                             pgfleet._list(m.keys, ' AND o.%1$I = h.%1$I', '')) END)
          INTO n USING srv, upto, _module;
        RETURN n;
    END LOOP;
    -- Nothing left: the old form goes, and the readers stop reading it.
    EXECUTE format('DROP TABLE %s', old);
    EXECUTE format('DROP TABLE IF EXISTS %s_once_v1', base);
    PERFORM pgfleet.metric_series(_module);
    PERFORM pgfleet.metric_extend(_module);
    RETURN 0;
END;
$fn$;

-- The old rows' history keys that are once-columns come from the old once
-- table: the join that brings them, for the readers (qualified).
CREATE FUNCTION pgfleet._v1_join(_module text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN pgfleet._hkeys(m) <@ m.keys THEN ''
                ELSE format(' LEFT JOIN pgfleet.%I o ON o.srvid OPERATOR(pg_catalog.=) h.srvid%s',
                            _module || '_once_v1',
                            pgfleet._list(m.keys, ' AND o.%1$I OPERATOR(pg_catalog.=) h.%1$I', '')) END
      FROM pgfleet.metric_sources m WHERE m.module = _module
$fn$;

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
                                                     %7$s AS ps, %6$s
                                                FROM (SELECT pg_catalog.string_to_array(h.v, ';') AS c OFFSET 0) x OFFSET 0) d
                          CROSS JOIN LATERAL pg_catalog.unnest(d.ps) WITH ORDINALITY AS p(pos, o)
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
                   $x$pg_catalog.array_positions(pg_catalog.string_to_array((h.at)::pg_catalog.text, NULL), '1')$x$,
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

-- <m>_sums: the same columns as <m>_series without ts, for sums over a
-- range: one row per window inside the range that has its totals, one per
-- other window (cut by the range's edges, or of 5 points or fewer) summing
-- its points in the range, and one per not-yet-aggregated row.  Like
-- <m>_series, it decodes only the columns its caller reads (the planner
-- drops the others from the inlined query).  Then the rollups, as before.
CREATE OR REPLACE FUNCTION pgfleet.metric_extend(_module text) RETURNS void
LANGUAGE plpgsql SET client_min_messages = warning SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    m pgfleet.metric_sources;
    r pgfleet.metric_rollups;
    base text := 'pgfleet.' || quote_ident(_module);
    keys_ regclass := to_regclass('pgfleet.' || quote_ident(_module || '_keys'));
    mc record;
    cols text[];
    types text[];
    summed text[];
    keydefs text;
    valdefs text;
    totals text;
    points text;
    unnests text;
    pnames text;
    v1 text := '';
    i integer;
    hk text[];
BEGIN
    SELECT * INTO m FROM pgfleet.metric_sources WHERE module = _module;
    IF m.module IS NULL OR keys_ IS NULL THEN
        RETURN;
    END IF;
    SELECT * INTO mc FROM pgfleet.metric_columns(_module);
    cols := mc.cols;
    types := ARRAY(SELECT format_type(t, NULL) FROM unnest(mc.types) t);
    summed := ARRAY(SELECT c FROM unnest(cols) c WHERE c = ANY (m.counters || m.deltas));
    -- The old generated columns' functions (0004), if a source still has them.
    EXECUTE format('DROP FUNCTION IF EXISTS %1$s_total(%1$s_point[]), %1$s_chunks(%1$s_point[]), %1$s_chunk_ts(%1$s_point[]) CASCADE', base);

    hk := pgfleet._hkeys(m);
    keydefs := pgfleet._coldefs(keys_, hk);
    valdefs := (SELECT string_agg(format('%I %s', c, t), ', ' ORDER BY o)
                  FROM unnest(cols, types) WITH ORDINALITY AS u(c, t, o));
    totals := (SELECT string_agg(pgfleet._dec(format($x$NULLIF(pg_catalog.split_part(h.t, ';', %s), '')$x$, j), mc.types[j]), ', ' ORDER BY j)
                 FROM generate_subscripts(cols, 1) j);
    -- The points of a window in the range, per column: counters and deltas
    -- summed over the slice of the array in the range, gauges as at its end.
    -- The slice: the window's snapshots in the range (b, the same for every
    -- entry of the window), then the entry's points among them (r, counting
    -- the bits of at before them).
    points := (SELECT string_agg(CASE WHEN cols[j] = ANY (summed)
                                      THEN format($x$(NULLIF((SELECT pg_catalog.sum(%s) FROM pg_catalog.unnest(d.a%s[r.lo:r.hi]) AS z), 0))::%s$x$,
                                                  pgfleet._elem('z', mc.types[j]), j, pgfleet._qualtype(mc.types[j]))
                                      ELSE pgfleet._elem(format('d.a%s[r.hi]', j), mc.types[j]) END, ', ' ORDER BY j)
                 FROM generate_subscripts(cols, 1) j);
    unnests := (SELECT string_agg(pgfleet._arr(j, mc.types[j]), ', ' ORDER BY j)
                  FROM generate_subscripts(cols, 1) j);
    pnames := $x$pg_catalog.array_positions(pg_catalog.string_to_array((h.at)::pg_catalog.text, NULL), '1')$x$;
    IF to_regclass(base || '_history_v1') IS NOT NULL THEN
        v1 := format($s$
                            UNION ALL
                            SELECT %2$s %3$s
                              FROM %1$s, pg_catalog.unnest(h.points) AS p
                             WHERE h.srvid OPERATOR(pg_catalog.=) _srvid
                               AND h.ts_start OPERATOR(pg_catalog.<=) _to
                               AND h.ts_end OPERATOR(pg_catalog.>=) _from
                               AND p.ts OPERATOR(pg_catalog.>=) _from AND p.ts OPERATOR(pg_catalog.<=) _to$s$,
                     base || '_history_v1 h' || pgfleet._v1_join(_module),
                     (SELECT string_agg(format(CASE WHEN c = ANY (m.keys) THEN 'h.%I, ' ELSE 'o.%I, ' END, c), '' ORDER BY n)
                        FROM unnest(hk) WITH ORDINALITY AS u(c, n)),
                     pgfleet._list(cols, 'p.%I'));
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS %s_sums(integer, timestamptz, timestamptz)', base);
    IF cols <> '{}' THEN
        EXECUTE format($f$CREATE FUNCTION %1$s_sums(_srvid integer, _from timestamptz, _to timestamptz)
                          RETURNS TABLE (%2$s)
                          LANGUAGE sql STABLE AS $s$
                            SELECT %3$s %4$s
                              FROM %1$s_keys k
                              JOIN %1$s_history h ON h.srvid OPERATOR(pg_catalog.=) k.srvid AND h.keyid OPERATOR(pg_catalog.=) k.keyid
                             WHERE k.srvid OPERATOR(pg_catalog.=) _srvid AND h.srvid OPERATOR(pg_catalog.=) _srvid
                               AND h.ts_start OPERATOR(pg_catalog.>=) _from
                               AND h.ts_end OPERATOR(pg_catalog.<=) _to
                               AND h.t IS NOT NULL
                            UNION ALL
                            SELECT %3$s %5$s
                              FROM %1$s_keys k
                              JOIN %1$s_history h ON h.srvid OPERATOR(pg_catalog.=) k.srvid AND h.keyid OPERATOR(pg_catalog.=) k.keyid
                              JOIN %1$s_windows w ON w.srvid OPERATOR(pg_catalog.=) h.srvid AND w.ts_start OPERATOR(pg_catalog.=) h.ts_start
                              CROSS JOIN LATERAL (SELECT %6$s FROM (SELECT pg_catalog.string_to_array(h.v, ';') AS c OFFSET 0) x OFFSET 0) d
                              CROSS JOIN LATERAL (SELECT COALESCE(pg_catalog.min(i) FILTER (WHERE w.ts[i] OPERATOR(pg_catalog.>=) _from),
                                                                         pg_catalog.cardinality(w.ts) OPERATOR(pg_catalog.+) 1) AS first,
                                                         COALESCE(pg_catalog.max(i) FILTER (WHERE w.ts[i] OPERATOR(pg_catalog.<=) _to), 0) AS last
                                                    FROM pg_catalog.generate_subscripts(w.ts, 1) AS i) b
                              CROSS JOIN LATERAL (SELECT pg_catalog.length(pg_catalog.replace(pg_catalog.substr((h.at)::pg_catalog.text, 1, b.first OPERATOR(pg_catalog.-) 1), '0', ''))
                                                           OPERATOR(pg_catalog.+) 1 AS lo,
                                                         pg_catalog.length(pg_catalog.replace(pg_catalog.substr((h.at)::pg_catalog.text, 1, b.last), '0', '')) AS hi) r
                             WHERE k.srvid OPERATOR(pg_catalog.=) _srvid AND h.srvid OPERATOR(pg_catalog.=) _srvid
                               AND h.ts_start OPERATOR(pg_catalog.<=) _to
                               AND h.ts_end OPERATOR(pg_catalog.>=) _from
                               AND (h.t IS NULL OR h.ts_start OPERATOR(pg_catalog.<) _from
                                    OR h.ts_end OPERATOR(pg_catalog.>) _to)
                               AND r.lo OPERATOR(pg_catalog.<=) r.hi%8$s
                            UNION ALL
                            SELECT %9$s FROM %1$s_current c
                             WHERE c.srvid OPERATOR(pg_catalog.=) _srvid
                               AND c.ts OPERATOR(pg_catalog.>=) _from
                               AND c.ts OPERATOR(pg_catalog.<=) _to
                          $s$$f$,
                       base, concat_ws(', ', nullif(keydefs, ''), valdefs),
                       pgfleet._list(hk, 'k.%I, ', ''), totals, points, unnests, pnames, v1,
                       pgfleet._list(hk, 'c.%I, ', '') || pgfleet._list(cols, 'c.%I'));
    END IF;

    SELECT * INTO r FROM pgfleet.metric_rollups WHERE module = _module;
    IF r.module IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s_rollup (srvid integer NOT NULL'
                   ' REFERENCES pgfleet.servers ON DELETE CASCADE%s, ts timestamptz NOT NULL)',
                   base, CASE WHEN r.keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(keys_, r.keys) END);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s_rollup (srvid, ts)', _module || '_rollup_srvid_ts', base);
    FOR i IN 1 .. coalesce(array_length(cols, 1), 0) LOOP
        IF cols[i] = ANY (summed || r.gauges) THEN
            EXECUTE format('ALTER TABLE %s_rollup ADD COLUMN IF NOT EXISTS %I %s', base, cols[i],
                           CASE WHEN types[i] IN ('integer', 'smallint') THEN 'bigint' ELSE types[i] END);
        END IF;
    END LOOP;
    PERFORM pgfleet.metric_inline_rollup(_module);
END;
$fn$;

-- Retention: whole day partitions go once older than every server's
-- retention (disk freed at once); rows of a server that keeps less than the
-- longest are deleted (their space is reused).  Windows and keys nothing
-- refers to any more go too.
CREATE OR REPLACE FUNCTION pgfleet.metric_purge(_module text, _srvid integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    m pgfleet.metric_sources;
    base text;
    cutoff timestamptz;
    oldest_kept timestamptz;
    part record;
    still_used boolean;
    hist text;
    hk text[];
    shared text[];  -- history keys that are keys: those <m>_last has
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    hk := pgfleet._hkeys(m);
    shared := ARRAY(SELECT c FROM unnest(hk) c WHERE c = ANY (m.keys));
    base := 'pgfleet.' || quote_ident(_module);
    SELECT now() - retention INTO cutoff FROM pgfleet.servers WHERE srvid = _srvid;
    SELECT now() - max(retention) INTO oldest_kept FROM pgfleet.servers;

    FOREACH hist IN ARRAY ARRAY['_history', '_history_v1'] LOOP
        CONTINUE WHEN to_regclass(base || hist) IS NULL;
        EXECUTE format('DELETE FROM %s%s WHERE srvid = $1 AND ts_start < $2 AND ts_end < $2', base, hist)
        USING _srvid, cutoff;
        FOR part IN
            SELECT c.oid::regclass AS rel,
                   (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper
              FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = (base || hist)::regclass
        LOOP
            CONTINUE WHEN part.upper >= oldest_kept;
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE ts_end >= $1)', part.rel)
            INTO still_used USING oldest_kept;
            IF NOT still_used THEN
                EXECUTE format('DROP TABLE %s', part.rel);
            END IF;
        END LOOP;
    END LOOP;
    EXECUTE format('DELETE FROM %s_windows WHERE srvid = $1 AND ts[cardinality(ts)] < $2', base)
    USING _srvid, cutoff;
    DELETE FROM pgfleet.history_usage WHERE srvid = _srvid AND module = _module AND last_ts < cutoff;

    -- A key is kept while its entry is live, waits in <m>_current or has
    -- history; a once-row likewise (live: an entry of <m>_last with the
    -- same keys, as far as the history keys are keys).
    EXECUTE format($q$
        DELETE FROM %1$s_keys k
         WHERE k.srvid = $1
           AND NOT EXISTS (SELECT 1 FROM %1$s_history h WHERE h.srvid = k.srvid AND h.keyid = k.keyid)
           AND NOT EXISTS (SELECT 1 FROM %1$s_last l WHERE l.srvid = k.srvid %2$s)
           AND NOT EXISTS (SELECT 1 FROM %1$s_current c WHERE c.srvid = k.srvid %3$s)$q$,
        base, pgfleet._list(shared, ' AND l.%1$I = k.%1$I', ''), pgfleet._list(hk, ' AND c.%1$I IS NOT DISTINCT FROM k.%1$I', ''))
    USING _srvid;
    IF m.onces <> '{}' THEN
        EXECUTE format($q$
            DELETE FROM %1$s_once o
             WHERE o.srvid = $1 AND o.first_seen < $2
               AND NOT EXISTS (SELECT 1 FROM %1$s_last l WHERE l.srvid = o.srvid %2$s)
               AND NOT EXISTS (SELECT 1 FROM %1$s_keys k WHERE k.srvid = o.srvid %3$s)
               AND NOT EXISTS (SELECT 1 FROM %1$s_current c WHERE c.srvid = o.srvid %4$s)%5$s$q$,
            base, pgfleet._list(shared, ' AND l.%1$I = o.%1$I', ''),
            pgfleet._list(hk, ' AND k.%1$I IS NOT DISTINCT FROM o.%1$I', ''),
            pgfleet._list(hk, ' AND c.%1$I IS NOT DISTINCT FROM o.%1$I', ''),
            CASE WHEN to_regclass(base || '_history_v1') IS NULL THEN ''
                 ELSE format(' AND NOT EXISTS (SELECT 1 FROM %1$s_history_v1 h WHERE h.srvid = o.srvid %2$s)',
                             base, pgfleet._list(shared, ' AND h.%1$I = o.%1$I', '')) END)
        USING _srvid, cutoff;
    END IF;
END;
$fn$;

-- A server unregistered: its rows go from every table of the source.
CREATE OR REPLACE FUNCTION pgfleet.metric_forget(_module text, _srvid integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    base text := 'pgfleet.' || quote_ident(_module);
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['_last', '_current', '_history', '_history_v1', '_windows', '_keys', '_once'] LOOP
        IF to_regclass(base || t) IS NOT NULL THEN
            EXECUTE format('DELETE FROM %s%s WHERE srvid = $1', base, t) USING _srvid;
        END IF;
    END LOOP;
    DELETE FROM pgfleet.metric_state WHERE srvid = _srvid AND module = _module;
    DELETE FROM pgfleet.history_usage WHERE srvid = _srvid AND module = _module;
END;
$fn$;

-- The snapshot body (0005, 0009) with history keys: a source whose history
-- keys are not its keys writes <m>_current and <m>_once per history key,
-- its deltas summed over the entries that share one.
CREATE OR REPLACE FUNCTION pgfleet.metric_snapshot_body(_module text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $function$
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
    hk text[];          -- the history's keys (0012): the keys unless a source groups
    grouped boolean;    -- entries of the server summed per history key
    hk_onces text[];    -- once-columns that are history keys
BEGIN
    SELECT * INTO STRICT m FROM pgfleet.metric_sources WHERE module = _module;
    hk := coalesce(m.history_keys, m.keys);
    grouped := hk <> m.keys;
    hk_onces := ARRAY(SELECT c FROM unnest(m.onces) c WHERE c = ANY (hk));
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
    IF grouped THEN
        -- No gauges, no tombstones; and <m>_current has the history keys.
        tomb := format('DELETE FROM %s_current WHERE false', base);
    END IF;

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
        INSERT INTO %5$s_current (srvid, ts %23$s %10$s)
        SELECT _srvid, j.ts %11$s %12$s FROM j WHERE NOT j.gone__%24$s
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
        -- A source grouping its entries (0012) sums them per history key.
        pgfleet._list(hk, ', j.%I', ''),
        CASE WHEN grouped THEN
               pgfleet._list(m.counters, ', nullif(sum(nullif(CASE WHEN NOT j.known__ THEN CASE WHEN _first THEN NULL ELSE j.%1$I END '
                                         'WHEN j.reset__ THEN j.%1$I ELSE j.%1$I - j.%1$I__prev END, 0)), 0)', '')
                   || pgfleet._list(m.deltas, ', nullif(sum(j.%I), 0)', '')
             ELSE
               pgfleet._list(m.counters, ', nullif(CASE WHEN NOT j.known__ THEN CASE WHEN _first THEN NULL ELSE j.%1$I END '
                                         'WHEN j.reset__ THEN j.%1$I ELSE j.%1$I - j.%1$I__prev END, 0)', '')
                   || pgfleet._list(m.deltas, ', nullif(j.%I, 0)', '') || pgfleet._list(m.gauges, ', j.%I', '') END,
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
                         base, pgfleet._list(hk, ', %I', ''),
                         pgfleet._list(ARRAY(SELECT c FROM unnest(m.onces) c WHERE c <> ALL (hk)), ', %I', ''),
                         pgfleet._list(hk, ', x.%I', ''),
                         pgfleet._list(ARRAY(SELECT c FROM unnest(m.onces) c WHERE c <> ALL (hk)), ', x.%I', '')) END,
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
            || pgfleet._list(ARRAY(SELECT c FROM unnest(m.onces) c WHERE c <> ALL (hk_onces)),
                             ', CASE WHEN p.srvid IS NULL THEN s.%1$I END AS %1$I', '')
            -- once-columns that are history keys: for every entry
            || pgfleet._list(hk_onces, ', s.%I', ''),
        -- 22: the staged rows
        staged,
        -- 23: key columns of current; 24: its grouping
        pgfleet._list(hk, ', %I', ''),
        CASE WHEN grouped THEN ' GROUP BY j.ts' || pgfleet._list(hk, ', j.%I', '') ELSE '' END);
END;
$function$;

-- create_metric_source: the same, making the compact history, and taking
-- history keys (a new last argument: the old signature goes).
DROP FUNCTION pgfleet.create_metric_source(text, text, text[], text[], text[], text[], text[],
                                           text, text, integer, text, boolean);
CREATE FUNCTION pgfleet.create_metric_source(
    _module text, _src_function text, _keys text[], _counters text[], _deltas text[],
    _gauges text[], _onces text[], _epoch text DEFAULT NULL, _scope text DEFAULT NULL,
    _priority integer DEFAULT 10, _query_cleanup text DEFAULT NULL,
    _added_manually boolean DEFAULT true, _history_keys text[] DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    tmp regclass;
    base text := 'pgfleet.' || quote_ident(_module);
    values_ text[] := _counters || _deltas || _gauges;
    missing text;
    c text;
    typ text;
    hk text[] := coalesce(_history_keys, _keys);
    extra text[];
    once_keys text[];
BEGIN
    IF _history_keys IS NOT NULL AND _history_keys = _keys THEN
        _history_keys := NULL;
    END IF;
    IF NOT hk <@ (_keys || _onces) THEN
        RAISE EXCEPTION 'history keys of "%" must be keys or once-columns', _module;
    END IF;
    IF _history_keys IS NOT NULL AND _gauges <> '{}' THEN
        RAISE EXCEPTION 'source "%" has gauges: its history keys must be its keys (only counters and deltas can be summed)', _module;
    END IF;
    extra := ARRAY(SELECT x FROM unnest(hk) x WHERE x <> ALL (_keys));
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

    INSERT INTO pgfleet.metric_sources (module, src_function, keys, counters, deltas, gauges, onces,
                                        epoch, scope, history_keys)
    VALUES (_module, _src_function, _keys, _counters, _deltas, _gauges, _onces, _epoch, _scope, _history_keys)
    ON CONFLICT (module) DO UPDATE
       SET src_function = excluded.src_function, keys = excluded.keys,
           counters = excluded.counters, deltas = excluded.deltas, gauges = excluded.gauges,
           onces = excluded.onces, epoch = excluded.epoch, scope = excluded.scope,
           history_keys = excluded.history_keys;

    -- History keys given to a source that has texts stored per key: they
    -- become one per history key (the first seen), and the old table stays
    -- as <m>_once_v1 for the old history's conversion to find its history
    -- keys in.
    IF to_regclass(base || '_once') IS NOT NULL THEN
        SELECT array_agg(a.attname::text ORDER BY a.attname) INTO once_keys
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = (base || '_once')::regclass AND i.indisprimary AND a.attname <> 'srvid';
        IF once_keys IS DISTINCT FROM (SELECT array_agg(x ORDER BY x) FROM unnest(hk) x) THEN
            IF to_regclass(base || '_once_v1') IS NOT NULL THEN
                RAISE EXCEPTION 'the history keys of source "%" changed again before its old history was converted: run pgfleet repo upgrade first', _module;
            END IF;
            EXECUTE format('ALTER TABLE %s_once RENAME TO %I', base, _module || '_once_v1');
            EXECUTE format('ALTER INDEX IF EXISTS pgfleet.%I RENAME TO %I', _module || '_once_pkey', _module || '_once_v1_pkey');
            EXECUTE format('CREATE TABLE %s_once (srvid integer NOT NULL, %s, first_seen timestamptz NOT NULL, PRIMARY KEY (srvid%s))',
                           base, pgfleet._coldefs(tmp, hk), pgfleet._list(hk, ', %I', ''));
            FOREACH c IN ARRAY ARRAY(SELECT x FROM unnest(_onces) x WHERE x <> ALL (hk)) LOOP
                SELECT format_type(atttypid, atttypmod) INTO typ FROM pg_attribute WHERE attrelid = tmp AND attname = c;
                EXECUTE format('ALTER TABLE %s_once ADD COLUMN %I %s', base, c, typ);
            END LOOP;
            EXECUTE format('INSERT INTO %1$s_once (srvid, %2$s, first_seen%3$s)
                            SELECT DISTINCT ON (srvid, %2$s) srvid, %2$s, first_seen%3$s FROM %1$s_once_v1
                             ORDER BY srvid, %2$s, first_seen',
                           base, pgfleet._list(hk),
                           pgfleet._list(ARRAY(SELECT x FROM unnest(_onces) x WHERE x <> ALL (hk)), ', %I', ''));
            -- Rows waiting for aggregation get the history keys they lack.
            IF to_regclass(base || '_current') IS NOT NULL AND extra <> '{}' THEN
                FOREACH c IN ARRAY extra LOOP
                    SELECT format_type(atttypid, atttypmod) INTO typ FROM pg_attribute WHERE attrelid = tmp AND attname = c;
                    EXECUTE format('ALTER TABLE %s_current ADD COLUMN IF NOT EXISTS %I %s', base, c, typ);
                END LOOP;
                EXECUTE format('UPDATE %1$s_current c SET %2$s FROM %1$s_once_v1 o WHERE o.srvid = c.srvid%3$s',
                               base, pgfleet._list(extra, '%1$I = o.%1$I'),
                               pgfleet._list(_keys, ' AND o.%1$I = c.%1$I', ''));
            END IF;
            IF to_regclass(base || '_history_v1') IS NULL THEN
                EXECUTE format('DROP TABLE %s_once_v1', base);
            END IF;
        END IF;
    END IF;

    -- The delta base is rewritten on every change of an entry: leave room on
    -- each page so those updates stay HOT (no new index entries, no bloat).
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s_last (srvid integer NOT NULL, ts timestamptz NOT NULL%s%s, PRIMARY KEY (srvid%s)) WITH (fillfactor = 50)',
                   base,
                   CASE WHEN _keys = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, _keys) END,
                   CASE WHEN _epoch IS NULL THEN '' ELSE ', ' || pgfleet._coldefs(tmp, ARRAY[_epoch]) END,
                   pgfleet._list(_keys, ', %I', ''));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s_current (srvid integer NOT NULL, ts timestamptz NOT NULL%s)',
                   base, CASE WHEN hk = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, hk) END);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s_current (srvid, ts)', _module || '_current_srvid_ts', base);
    FOREACH c IN ARRAY hk LOOP
        SELECT format_type(atttypid, atttypmod) INTO typ FROM pg_attribute WHERE attrelid = tmp AND attname = c;
        EXECUTE format('ALTER TABLE %s_current ADD COLUMN IF NOT EXISTS %I %s', base, c, typ);
    END LOOP;
    -- The point type lists the value columns in the order the history
    -- writes them: a column added later is appended.
    IF to_regtype(base || '_point') IS NULL THEN
        EXECUTE format('CREATE TYPE %s_point AS (ts timestamptz)', base);
    END IF;
    PERFORM pgfleet.metric_storage(_module);

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
                       base, CASE WHEN hk = '{}' THEN '' ELSE ', ' || pgfleet._coldefs(tmp, hk) END,
                       pgfleet._list(hk, ', %I', ''));
        FOREACH c IN ARRAY ARRAY(SELECT x FROM unnest(_onces) x WHERE x <> ALL (hk)) LOOP
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
    PERFORM pgfleet.metric_extend(_module);

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
$fn$;

-- Every existing source: the old history steps aside (a rename: no rows
-- move now), the new tables are made and the readers read both.
DO $fn$
DECLARE
    m record;
    p record;
    base text;
BEGIN
    FOR m IN SELECT module FROM pgfleet.metric_sources ORDER BY module LOOP
        base := 'pgfleet.' || quote_ident(m.module);
        IF to_regclass(base || '_history') IS NOT NULL THEN
            FOR p IN
                SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = (base || '_history')::regclass
            LOOP
                EXECUTE format('ALTER TABLE pgfleet.%I RENAME TO %I', p.relname,
                               m.module || '_v1_' || right(p.relname, 8));
            END LOOP;
            EXECUTE format('ALTER TABLE %s_history RENAME TO %I', base, m.module || '_history_v1');
            EXECUTE format('ALTER INDEX IF EXISTS pgfleet.%I RENAME TO %I',
                           m.module || '_history_key', m.module || '_history_v1_key');
            -- The totals and chunks (0004) were only for the old readers.
            EXECUTE format('ALTER TABLE %s_history_v1 DROP COLUMN IF EXISTS total,'
                           ' DROP COLUMN IF EXISTS chunks, DROP COLUMN IF EXISTS chunk_ts', base);
        END IF;
        PERFORM pgfleet.metric_storage(m.module);
        PERFORM pgfleet.metric_series(m.module);
        PERFORM pgfleet.metric_extend(m.module);
    END LOOP;
END;
$fn$;

-- What the collector's Prometheus exporter shows of a user's source.
--
-- The built-in sources have their families declared in the exporter
-- (collector/exporter/views.py); a user's source had none: it went to the
-- repository only.  pgfleet.metric_exports says which of its columns become
-- labels and which counters or gauges, each exported as
-- pgfleet_custom_<module>_<column> (counters with _total) with the label
-- server and the label columns.  The names are checked here, where a user
-- writes them, and again by the collector, which takes nothing it reads from
-- the repository as a valid Prometheus name on trust.
--
-- This release's built-in sources also gained columns (pg_stat_database's
-- xid ages, pg_stat_user_tables' last vacuum and analyze, pg_stat_statements'
-- min, max and stddev times, settings as numbers) and sources (pg_locks,
-- postmaster, pg_stat_progress_vacuum, database_size), installed as always
-- by the upgrade after the migrations, in place (columns added, nothing
-- dropped).  That this migration exists makes a collector of this release
-- wait for the upgrade, rather than COPY rows of the new shape into
-- transient tables of the old one.

-- Everything below whatever the migrating session's path (see 0009);
-- restored at the end.
SELECT pg_catalog.set_config('pgfleet.migrating_search_path',
                             pg_catalog.current_setting('search_path'), true),
       pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

-- One row per exported column.  Names: lower case letters, digits and _,
-- starting with a letter (what PostgreSQL makes of an unquoted identifier,
-- and always a valid Prometheus name); a value column cannot end like the
-- samples of another type (_total, _created, _count, _sum, _bucket, _info),
-- nor a label be one Prometheus or pgfleet sets itself.
CREATE TABLE pgfleet.metric_exports (
    module text NOT NULL,
    column_name text NOT NULL,
    kind text NOT NULL,
    help text NOT NULL DEFAULT '',
    PRIMARY KEY (module, column_name),
    CONSTRAINT metric_exports_kind CHECK (kind IN ('label', 'counter', 'gauge')),
    CONSTRAINT metric_exports_module CHECK (module ~ '^[a-z][a-z0-9_]*$' AND length(module) <= 40),
    CONSTRAINT metric_exports_column
        CHECK (column_name ~ '^[a-z][a-z0-9_]*$' AND length(column_name) <= 63),
    CONSTRAINT metric_exports_value_name
        CHECK (kind = 'label' OR column_name !~ '_(total|created|count|sum|bucket|info)$'),
    CONSTRAINT metric_exports_label_name
        CHECK (kind <> 'label' OR column_name NOT IN ('server', 'instance', 'job', 'le', 'quantile')),
    CONSTRAINT metric_exports_help CHECK (length(help) <= 300 AND help !~ '[[:cntrl:]]')
);

COMMENT ON TABLE pgfleet.metric_exports IS
    'Columns of user sources the collector exports to Prometheus (pgfleet.export_source)';

-- Declare (or replace) what a user's source exports: _labels become labels,
-- _counters counters, _gauges gauges; _help maps a value column to its HELP
-- text.  No counter and no gauge: the source is exported no more.  The
-- source must be registered (a snapshot row of pgfleet.functions added
-- manually) with its transient table, which has the columns: counters and
-- gauges of a numeric type or boolean (a gauge may be a timestamptz too,
-- exported as Unix time), labels of any type.
CREATE FUNCTION pgfleet.export_source(
    _module text, _labels text[] DEFAULT '{}', _counters text[] DEFAULT '{}',
    _gauges text[] DEFAULT '{}', _help jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    src text;
    tmp regclass;
    c text;
    typ regtype;
    every text[] := coalesce(_labels, '{}') || coalesce(_counters, '{}') || coalesce(_gauges, '{}');
BEGIN
    SELECT f.query_source INTO src FROM pgfleet.functions f
     WHERE f.module = _module AND f.operation = 'snapshot' AND f.added_manually;
    IF src IS NULL THEN
        RAISE EXCEPTION 'no source "%" of yours is registered with a query_source function', _module
              USING HINT = 'Built-in sources have families of their own (docs/metrics.md).';
    END IF;
    tmp := to_regclass(src || '_tmp');
    IF tmp IS NULL THEN
        RAISE EXCEPTION 'source "%" has no transient table %_tmp', _module, src;
    END IF;
    IF (SELECT count(DISTINCT x) FROM unnest(every) x) <> cardinality(every) THEN
        RAISE EXCEPTION 'a column of source "%" is exported twice', _module;
    END IF;
    IF _help IS NOT NULL AND jsonb_typeof(_help) <> 'object' THEN
        RAISE EXCEPTION 'help texts of source "%" must be a JSON object: column -> text', _module;
    END IF;
    FOREACH c IN ARRAY every LOOP
        SELECT a.atttypid::regtype INTO typ FROM pg_attribute a
         WHERE a.attrelid = tmp AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped;
        IF typ IS NULL THEN
            RAISE EXCEPTION 'transient table % has no column "%"', tmp, c;
        END IF;
        IF c <> ALL (coalesce(_labels, '{}'))
           AND typ <> ALL ('{smallint,integer,bigint,real,double precision,numeric,boolean}'::regtype[])
           AND NOT (c = ANY (coalesce(_gauges, '{}')) AND typ = 'timestamptz'::regtype) THEN
            RAISE EXCEPTION 'column "%" of source "%" is %: a counter or gauge must be a number or boolean (a gauge may be a timestamptz)',
                  c, _module, typ;
        END IF;
    END LOOP;
    DELETE FROM pgfleet.metric_exports WHERE module = _module;
    IF coalesce(cardinality(_counters), 0) + coalesce(cardinality(_gauges), 0) = 0 THEN
        RETURN;
    END IF;
    INSERT INTO pgfleet.metric_exports (module, column_name, kind, help)
    SELECT _module, x.c, x.kind, coalesce(_help ->> x.c, '')
      FROM (SELECT unnest(coalesce(_labels, '{}')) AS c, 'label' AS kind
            UNION ALL SELECT unnest(coalesce(_counters, '{}')), 'counter'
            UNION ALL SELECT unnest(coalesce(_gauges, '{}')), 'gauge') x;
END;
$fn$;

-- What the collector reads, with its sources: each exported column of an
-- enabled user source, its position in the source's rows as the collector
-- fetches them (those of the transient table: srvid 0, then the source's
-- columns in order) and its type.  A column gone from the transient table
-- is left out.
CREATE FUNCTION pgfleet.exported_columns()
RETURNS TABLE (module text, column_name text, "position" integer, kind text, type text, help text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT e.module, e.column_name, a.position, e.kind, a.type, e.help
      FROM pgfleet.metric_exports e
      JOIN pgfleet.functions f
        ON f.module = e.module AND f.operation = 'snapshot' AND f.added_manually AND f.enabled
      JOIN LATERAL (
          SELECT t.attname::text AS attname, t.type, t.position
            FROM (SELECT a.attname, format_type(a.atttypid, NULL) AS type,
                         (row_number() OVER (ORDER BY a.attnum) - 1)::integer AS position
                    FROM pg_attribute a
                   WHERE a.attrelid = to_regclass(f.query_source || '_tmp')
                     AND a.attnum > 0 AND NOT a.attisdropped) t
      ) a ON a.attname = e.column_name
     ORDER BY e.module, a.position;
$fn$;

-- Unregistering a module forgets what it exported too.
CREATE OR REPLACE FUNCTION pgfleet.unregister_module(_module text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    fn text;
BEGIN
    SELECT function_name INTO fn FROM pgfleet.functions
     WHERE module = _module AND operation = 'unregister';
    IF fn IS NOT NULL THEN
        EXECUTE format('SELECT %s(0)', fn::regproc);
    END IF;
    DELETE FROM pgfleet.functions WHERE module = _module;
    DELETE FROM pgfleet.metric_exports WHERE module = _module;
END;
$fn$;

SELECT pg_catalog.set_config('search_path',
                             pg_catalog.current_setting('pgfleet.migrating_search_path'), true);

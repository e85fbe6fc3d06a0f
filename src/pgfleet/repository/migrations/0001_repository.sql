-- pgfleet repository, first version: servers, snapshot bookkeeping and the
-- datasource registry.  Everything lives in schema pgfleet.

CREATE SCHEMA IF NOT EXISTS pgfleet;

-- srvid 0 is the repository's own instance (local mode); remote servers get
-- srvid >= 1 from the sequence.
CREATE SEQUENCE pgfleet.servers_srvid_seq MINVALUE 1;

CREATE TABLE pgfleet.servers (
    srvid integer PRIMARY KEY DEFAULT nextval('pgfleet.servers_srvid_seq'),
    alias text NOT NULL UNIQUE CHECK (alias ~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]*$'),
    host text NOT NULL DEFAULT '',
    port integer NOT NULL DEFAULT 5432 CHECK (port BETWEEN 1 AND 65535),
    username text NOT NULL DEFAULT '',
    dbname text NOT NULL DEFAULT 'postgres',
    -- Never a password: a reference resolved by the collector at connect time
    -- ('env:VARIABLE' or 'file:/path'), or NULL to let libpq use its passfile,
    -- service file or PGPASSWORD.
    password_ref text CHECK (password_ref ~ '^(env|file):.+$'),
    -- Extra libpq parameters (sslmode, service, ...) as key=value pairs.
    options text NOT NULL DEFAULT '' CHECK (options !~* '(^|\s)password\s*='),
    frequency integer NOT NULL DEFAULT 300 CHECK (frequency >= 1),
    coalesce integer NOT NULL DEFAULT 100 CHECK (coalesce >= 1),
    retention interval NOT NULL DEFAULT '7 days' CHECK (retention > '0'::interval),
    enabled boolean NOT NULL DEFAULT true,
    added_at timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE pgfleet.servers_srvid_seq OWNED BY pgfleet.servers.srvid;

INSERT INTO pgfleet.servers (srvid, alias, host, frequency)
VALUES (0, 'local', '', 300);

CREATE TABLE pgfleet.snapshot_state (
    srvid integer PRIMARY KEY REFERENCES pgfleet.servers ON DELETE CASCADE,
    snapshots bigint NOT NULL DEFAULT 0,
    coalesce_seq integer NOT NULL DEFAULT 0,   -- snapshots since the last aggregate
    aggregates bigint NOT NULL DEFAULT 0,      -- a purge follows every 10th
    last_snapshot timestamptz,
    last_aggregate timestamptz,
    last_purge timestamptz,
    last_error timestamptz,
    server_version_num integer,
    in_recovery boolean
);

-- The recent collection errors of each server, newest kept (see record_error).
CREATE TABLE pgfleet.snapshot_errors (
    srvid integer NOT NULL REFERENCES pgfleet.servers ON DELETE CASCADE,
    ts timestamptz NOT NULL DEFAULT now(),
    source text NOT NULL,
    message text NOT NULL
);
CREATE INDEX ON pgfleet.snapshot_errors (srvid, ts DESC);

-- The datasource registry: the extension API.  One row per module and
-- operation; query_source names the function whose "<name>_tmp" table the
-- collector fills in remote mode.
CREATE TABLE pgfleet.functions (
    module text NOT NULL,
    operation text NOT NULL
        CHECK (operation IN ('snapshot', 'aggregate', 'purge', 'unregister')),
    function_name text NOT NULL,
    query_source text,
    query_cleanup text,
    added_manually boolean NOT NULL DEFAULT true,
    enabled boolean NOT NULL DEFAULT true,
    priority integer NOT NULL DEFAULT 10,
    PRIMARY KEY (module, operation),
    CHECK (query_source IS NULL OR operation = 'snapshot')
);

CREATE FUNCTION pgfleet.record_error(_srvid integer, _source text, _message text)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO pgfleet.snapshot_errors (srvid, source, message)
    VALUES (_srvid, _source, _message);
    UPDATE pgfleet.snapshot_state SET last_error = now() WHERE srvid = _srvid;
    -- Keep the 100 newest per server: errors are for "what went wrong
    -- recently", and a server failing every minute must not grow this forever.
    DELETE FROM pgfleet.snapshot_errors e
     WHERE e.srvid = _srvid
       AND e.ts < (SELECT ts FROM pgfleet.snapshot_errors
                    WHERE srvid = _srvid ORDER BY ts DESC OFFSET 99 LIMIT 1);
$$;

-- Serialises the repository side of snapshots: transient tables are emptied
-- with TRUNCATE, whose lock would deadlock two transactions that both staged
-- rows in the same table.  The lock is held only while staged rows are
-- written, never while a monitored server is being queried.
CREATE FUNCTION pgfleet.snapshot_lock() RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtext('pgfleet.snapshot'));
$$;

-- Run a registered operation of every (or the named) enabled module for one
-- server, each in its own subtransaction: one failing source never loses the
-- others, its error is recorded instead.  Returns the number of failures.
CREATE FUNCTION pgfleet.run_operation(_srvid integer, _operation text, _modules text[] DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql AS $$
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
            failures := failures + 1;
            PERFORM pgfleet.record_error(_srvid, r.module,
                                         format('%s failed: %s', _operation, SQLERRM));
        END;
    END LOOP;
    RETURN failures;
END;
$$;

-- One snapshot of a server: the snapshot functions of the given modules (all
-- enabled ones when NULL), then aggregate every "coalesce" snapshots and purge
-- every 10 aggregates.  In remote mode the collector has staged the rows in
-- the transient tables first, in the same transaction.
CREATE FUNCTION pgfleet.take_snapshot(_srvid integer, _modules text[] DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    failures integer;
    st pgfleet.snapshot_state;
    srv pgfleet.servers;
BEGIN
    PERFORM pgfleet.snapshot_lock();
    SELECT * INTO srv FROM pgfleet.servers WHERE srvid = _srvid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no server with srvid %', _srvid;
    END IF;
    INSERT INTO pgfleet.snapshot_state (srvid) VALUES (_srvid) ON CONFLICT DO NOTHING;

    failures := pgfleet.run_operation(_srvid, 'snapshot', _modules);

    UPDATE pgfleet.snapshot_state
       SET snapshots = snapshots + 1, coalesce_seq = coalesce_seq + 1, last_snapshot = now()
     WHERE srvid = _srvid
    RETURNING * INTO st;

    IF st.coalesce_seq >= srv.coalesce THEN
        failures := failures + pgfleet.run_operation(_srvid, 'aggregate');
        UPDATE pgfleet.snapshot_state
           SET coalesce_seq = 0, aggregates = aggregates + 1, last_aggregate = now()
         WHERE srvid = _srvid
        RETURNING * INTO st;
        IF st.aggregates % 10 = 0 THEN
            failures := failures + pgfleet.run_operation(_srvid, 'purge');
            UPDATE pgfleet.snapshot_state SET last_purge = now() WHERE srvid = _srvid;
        END IF;
    END IF;
    RETURN failures;
END;
$$;

-- Drop a module: its unregister function runs (it must at least delete the
-- module's registry rows), and whatever it left in the registry goes too.
-- Collected data is kept; purge and retention decide when it goes.
CREATE FUNCTION pgfleet.unregister_module(_module text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    fn text;
BEGIN
    SELECT function_name INTO fn FROM pgfleet.functions
     WHERE module = _module AND operation = 'unregister';
    IF fn IS NOT NULL THEN
        EXECUTE format('SELECT %s(0)', fn::regproc);
    END IF;
    DELETE FROM pgfleet.functions WHERE module = _module;
END;
$$;

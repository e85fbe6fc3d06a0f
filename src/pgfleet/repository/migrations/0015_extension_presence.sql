-- A source whose extension disappears from a server is unregistered for that
-- server, and registered again when the extension comes back (issue 18).
--
-- The registry (pgfleet.functions) is the whole fleet's: unregistering a
-- module there because one server dropped an extension would stop it on
-- every other.  So "unregistered for a server" is per server:
--
-- - pgfleet.source_absence records that the server lacks the source's
--   extension, since when: the web UI and `pgfleet repo size` keep its
--   history (nothing collected is deleted);
-- - the server's delta base of the source (<m>_last, and metric_state, which
--   says whether the next snapshot is the first) is forgotten at once: an
--   extension created again starts its counters from zero, and its first
--   snapshot is then a first snapshot, not deltas against old counters.
--
-- Remote servers: the collector tells, at every snapshot, which sources it
-- skipped for a missing extension and which ran (pgfleet.source_presence, in
-- the snapshot's transaction).  Local mode (srvid 0, the repository itself):
-- the same at each local snapshot, and an event trigger on DROP/CREATE
-- EXTENSION in the repository does it at once.

-- Which extension a source needs.  Built-in sources are written here when
-- installed; a user's source may be too (INSERT ... ON CONFLICT).
CREATE TABLE pgfleet.source_extensions (
    module text PRIMARY KEY,
    extension text NOT NULL
);

CREATE TABLE pgfleet.source_absence (
    srvid integer NOT NULL REFERENCES pgfleet.servers ON DELETE CASCADE,
    module text NOT NULL,
    extension text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (srvid, module)
);

-- (pgfleet_read reads them: 0004's default privileges.)

-- _absent: the server's sources whose extension it lacks now; _present: those
-- that ran.  Returns how many were newly unregistered.  Idempotent: a source
-- already absent keeps its "since".
CREATE FUNCTION pgfleet.source_presence(_srvid integer, _absent text[], _present text[])
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    m record;
    n integer := 0;
BEGIN
    IF cardinality(_present) > 0 THEN
        DELETE FROM pgfleet.source_absence WHERE srvid = _srvid AND module = ANY (_present);
    END IF;
    IF cardinality(_absent) = 0 THEN
        RETURN 0;
    END IF;
    FOR m IN
        INSERT INTO pgfleet.source_absence AS a (srvid, module, extension)
        SELECT _srvid, u.module, coalesce(e.extension, '')
          FROM unnest(_absent) AS u(module)
          LEFT JOIN pgfleet.source_extensions e ON e.module = u.module
        ON CONFLICT DO NOTHING
        RETURNING a.module
    LOOP
        n := n + 1;
        -- A metric source's delta base for this server; a source of the
        -- user's own making has none we know of.
        IF to_regclass('pgfleet.' || quote_ident(m.module || '_last')) IS NOT NULL
           AND EXISTS (SELECT FROM pgfleet.metric_sources s WHERE s.module = m.module) THEN
            EXECUTE format('DELETE FROM pgfleet.%I WHERE srvid = $1', m.module || '_last')
              USING _srvid;
            DELETE FROM pgfleet.metric_state WHERE srvid = _srvid AND module = m.module;
        END IF;
    END LOOP;
    RETURN n;
END;
$fn$;

-- Local mode: the repository's own extensions, as they are dropped and made.
CREATE FUNCTION pgfleet.on_extension_ddl() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    exts text[];
    mods text[];
BEGIN
    IF NOT EXISTS (SELECT FROM pgfleet.servers WHERE srvid = 0) THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'sql_drop' THEN
        SELECT array_agg(coalesce(object_name, address_names[1])) INTO exts
          FROM pg_event_trigger_dropped_objects() WHERE object_type = 'extension';
        -- DROP SCHEMA pgfleet CASCADE, or the extension's own objects.
        IF exts IS NULL OR to_regclass('pgfleet.source_extensions') IS NULL THEN
            RETURN;
        END IF;
        SELECT array_agg(module) INTO mods FROM pgfleet.source_extensions
         WHERE extension = ANY (exts);
        IF mods IS NOT NULL THEN
            PERFORM pgfleet.source_presence(0, mods, '{}');
        END IF;
    ELSE
        SELECT array_agg(e.extname::text) INTO exts
          FROM pg_event_trigger_ddl_commands() c
          JOIN pg_extension e ON e.oid = c.objid
         WHERE c.object_type = 'extension';
        SELECT array_agg(module) INTO mods FROM pgfleet.source_extensions
         WHERE extension = ANY (exts);
        IF mods IS NOT NULL THEN
            PERFORM pgfleet.source_presence(0, '{}', mods);
        END IF;
    END IF;
EXCEPTION WHEN OTHERS THEN
    -- Never in the way of the user's DDL: the next local snapshot tells.
    RAISE WARNING 'pgfleet: extension presence not recorded: %', SQLERRM;
END;
$fn$;

-- Event triggers need a superuser: a repository installed by another role
-- goes without (the local snapshots still tell, at their pace).
DO $fn$
BEGIN
    CREATE EVENT TRIGGER pgfleet_extension_drop ON sql_drop
        WHEN TAG IN ('DROP EXTENSION') EXECUTE FUNCTION pgfleet.on_extension_ddl();
    CREATE EVENT TRIGGER pgfleet_extension_create ON ddl_command_end
        WHEN TAG IN ('CREATE EXTENSION') EXECUTE FUNCTION pgfleet.on_extension_ddl();
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'pgfleet: no event trigger on extensions (it needs a superuser): local mode notices a dropped extension at its next snapshot';
END;
$fn$;

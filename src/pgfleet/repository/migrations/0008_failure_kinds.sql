-- Every recorded failure says what kind it is: connect, query, timeout,
-- cancelled (by the collector) or store (the repository refused the rows,
-- or the source's snapshot function failed).  The collector sets the kind
-- where it catches the failure; nobody guesses it back from the message.
--
-- Rows recorded before this migration have no kind (NULL): their kind was
-- never known, only a message.
ALTER TABLE pgfleet.snapshot_errors
    ADD COLUMN kind text CHECK (kind IN ('connect', 'query', 'timeout', 'cancelled', 'store'));

DROP FUNCTION pgfleet.record_error(integer, text, text);

CREATE FUNCTION pgfleet.record_error(_srvid integer, _source text, _message text, _kind text)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO pgfleet.snapshot_errors (srvid, source, message, kind)
    VALUES (_srvid, _source, _message, _kind);
    UPDATE pgfleet.snapshot_state SET last_error = now() WHERE srvid = _srvid;
    -- Keep the 100 newest per server: errors are for "what went wrong
    -- recently", and a server failing every minute must not grow this forever.
    DELETE FROM pgfleet.snapshot_errors e
     WHERE e.srvid = _srvid
       AND e.ts < (SELECT ts FROM pgfleet.snapshot_errors
                    WHERE srvid = _srvid ORDER BY ts DESC OFFSET 99 LIMIT 1);
$$;

-- A registered function failing in the repository is a failure to store.
CREATE OR REPLACE FUNCTION pgfleet.run_operation(_srvid integer, _operation text, _modules text[] DEFAULT NULL)
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
                                         format('%s failed: %s', _operation, SQLERRM), 'store');
        END;
    END LOOP;
    RETURN failures;
END;
$$;

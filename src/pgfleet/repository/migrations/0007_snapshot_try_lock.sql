-- The snapshot lock, without waiting: true if this transaction now holds it.
--
-- A one-shot remote snapshot streams its largest source into the transient
-- table while the monitored server is still sending it, which means taking
-- the lock before the fetch is over.  It does so only when no other store
-- holds the lock (otherwise it fetches first and stores after, as the daemon
-- does), so that it never queues behind others while holding a server's
-- rows in flight.
CREATE FUNCTION pgfleet.snapshot_try_lock() RETURNS boolean LANGUAGE sql AS $$
    SELECT pg_try_advisory_xact_lock(hashtext('pgfleet.snapshot'));
$$;

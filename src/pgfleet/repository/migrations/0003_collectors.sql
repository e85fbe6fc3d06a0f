-- Collector daemons: the fleet shared between collectors through leases,
-- servers registered by discovery providers, and the command channel.

-- Servers registered by a discovery provider ('static', 'file_sd') rather
-- than with 'pgfleet server add' (NULL).  The repository provider lists the
-- latter only, so a server that left its file is not collected by accident.
ALTER TABLE pgfleet.servers ADD COLUMN provider text;

-- The live collectors: each renews its row with its leases.
CREATE TABLE pgfleet.collectors (
    name text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

-- Who collects each server.  A lease not renewed by expires_at may be taken
-- by another collector; expiry is judged by the repository's clock only, so
-- collectors' clocks need not agree.  Stores are fenced: a snapshot is
-- written only in a transaction that holds its server's lease row FOR SHARE
-- (see lease_held), so a collector that lost a lease cannot write after the
-- new owner started.
CREATE TABLE pgfleet.collector_leases (
    srvid integer PRIMARY KEY REFERENCES pgfleet.servers ON DELETE CASCADE,
    owner text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX ON pgfleet.collector_leases (owner);

-- One lease round of collector _owner, which sees the servers _srvids:
-- heartbeat, let go of servers it no longer sees, renew the rest, then take
-- free or expired leases up to its fair share (the fleet divided by the live
-- collectors, rounded up).  It does not give up leases above its share:
-- the collector first stops those servers' snapshots, then calls
-- lease_release.  Returns what it holds afterwards.
CREATE FUNCTION pgfleet.lease_round(
    _owner text, _host text, _pid integer, _period interval, _srvids integer[])
RETURNS TABLE (owned integer[], share integer, collectors integer)
LANGUAGE plpgsql AS $$
DECLARE
    _have integer;
BEGIN
    INSERT INTO pgfleet.collectors AS c (name, host, pid, expires_at)
    VALUES (_owner, _host, _pid, now() + _period)
    ON CONFLICT (name) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, heartbeat = now(),
           expires_at = excluded.expires_at,
           started_at = CASE WHEN c.pid = excluded.pid THEN c.started_at ELSE now() END;
    DELETE FROM pgfleet.collectors WHERE expires_at < now() - 10 * _period;

    DELETE FROM pgfleet.collector_leases
     WHERE owner = _owner AND NOT (srvid = ANY (_srvids));
    UPDATE pgfleet.collector_leases SET expires_at = now() + _period WHERE owner = _owner;

    SELECT count(*) INTO collectors FROM pgfleet.collectors WHERE expires_at > now();
    share := ceil(cardinality(_srvids)::numeric / greatest(collectors, 1));
    SELECT count(*) INTO _have FROM pgfleet.collector_leases WHERE owner = _owner;
    IF _have < share THEN
        -- Each collector prefers different servers (the hash includes its
        -- name), so that collectors starting together rarely contend.  The
        -- WHERE of ON CONFLICT is rechecked on the latest row version: of
        -- two collectors racing for one lease, one gets it.
        INSERT INTO pgfleet.collector_leases AS l (srvid, owner, expires_at)
        SELECT s.srvid, _owner, now() + _period
          FROM unnest(_srvids) AS s(srvid)
         WHERE EXISTS (SELECT 1 FROM pgfleet.servers v WHERE v.srvid = s.srvid)
           AND NOT EXISTS (SELECT 1 FROM pgfleet.collector_leases o
                            WHERE o.srvid = s.srvid AND o.expires_at >= now())
         ORDER BY hashtext(_owner || ':' || s.srvid)
         LIMIT share - _have
        ON CONFLICT (srvid) DO UPDATE
           SET owner = excluded.owner, expires_at = excluded.expires_at, acquired_at = now()
         WHERE l.expires_at < now();
    END IF;
    owned := ARRAY(SELECT l.srvid FROM pgfleet.collector_leases l
                    WHERE l.owner = _owner ORDER BY l.srvid);
    RETURN NEXT;
END;
$$;

-- The fence of every store: true, with the lease row locked until the end of
-- the transaction, if _owner holds _srvid's lease (expired or not: nobody
-- else took it).
CREATE FUNCTION pgfleet.lease_held(_srvid integer, _owner text)
RETURNS boolean LANGUAGE sql AS $$
    SELECT EXISTS (SELECT 1 FROM pgfleet.collector_leases
                    WHERE srvid = _srvid AND owner = _owner FOR SHARE);
$$;

CREATE FUNCTION pgfleet.lease_release(_owner text, _srvids integer[])
RETURNS void LANGUAGE sql AS $$
    DELETE FROM pgfleet.collector_leases WHERE owner = _owner AND srvid = ANY (_srvids);
$$;

-- A collector stopping cleanly: its leases go at once (others take its
-- servers at their next round), except those it keeps for the snapshots it
-- still has spooled, which it may store after a restart.
CREATE FUNCTION pgfleet.collector_leave(_owner text, _keep integer[])
RETURNS void LANGUAGE sql AS $$
    DELETE FROM pgfleet.collector_leases WHERE owner = _owner AND NOT (srvid = ANY (_keep));
    DELETE FROM pgfleet.collectors WHERE name = _owner;
$$;

-- The command channel.  NOTIFY itself cannot be restricted: any role that
-- can connect may notify any channel, and the listener learns only the
-- sender's backend pid.  So a command counts only if a matching request row
-- exists: pgfleet.collector_command() inserts it and then notifies, in one
-- transaction.  Only pgfleet_admin may insert, and only the payload and
-- channel columns: sender and pid take their defaults (session_user,
-- pg_backend_pid()) and cannot be forged.  The collector accepts a
-- notification only if a request row has the notifying backend's pid and the
-- same payload and channel, and its sender is still a member of
-- pgfleet_admin; each row serves once per collector.  A NOTIFY sent by hand
-- finds no row and is answered KO.
CREATE TABLE pgfleet.collector_requests (
    id bigserial PRIMARY KEY,
    sender name NOT NULL DEFAULT session_user,
    pid integer NOT NULL DEFAULT pg_backend_pid(),
    channel text NOT NULL,
    payload text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON pgfleet.collector_requests FROM PUBLIC;

-- Answers too long for a NOTIFY payload (8000 bytes): the notification says
-- "COMMAND OK|KO @reply ID" and the body is here.  Only pgfleet_admin reads.
CREATE TABLE pgfleet.collector_replies (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON pgfleet.collector_replies FROM PUBLIC;

-- Send a command to the collectors: 'COMMAND RESPONSE_CHANNEL [ARGS...]'.
-- Not SECURITY DEFINER: it runs with the caller's rights, which must include
-- inserting into collector_requests.
CREATE FUNCTION pgfleet.collector_command(_payload text, _channel text DEFAULT 'pgfleet_collector')
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF to_regrole('pgfleet_admin') IS NULL THEN
        RAISE EXCEPTION 'role pgfleet_admin does not exist: create it, then SELECT pgfleet.grant_admin()'
              USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT pg_has_role(session_user, 'pgfleet_admin', 'MEMBER') THEN
        RAISE EXCEPTION 'permission denied: role "%" is not a member of pgfleet_admin', session_user
              USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO pgfleet.collector_requests (channel, payload) VALUES (_channel, _payload);
    PERFORM pg_notify(_channel, _payload);
END;
$$;

-- The role whose members may command collectors.  Roles belong to the
-- cluster, not the database: it may exist already, or we may lack the right
-- to create it, in which case an administrator creates it and then runs
-- SELECT pgfleet.grant_admin() (idempotent).
DO $$
BEGIN
    IF to_regrole('pgfleet_admin') IS NULL THEN
        CREATE ROLE pgfleet_admin NOLOGIN;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'cannot create role pgfleet_admin: %; create it, then SELECT pgfleet.grant_admin()', SQLERRM;
END;
$$;

CREATE FUNCTION pgfleet.grant_admin() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF to_regrole('pgfleet_admin') IS NULL THEN
        RETURN;
    END IF;
    GRANT USAGE ON SCHEMA pgfleet TO pgfleet_admin;
    GRANT SELECT ON pgfleet.schema_migrations, pgfleet.servers, pgfleet.collectors,
                    pgfleet.collector_leases, pgfleet.collector_replies TO pgfleet_admin;
    GRANT INSERT (channel, payload) ON pgfleet.collector_requests TO pgfleet_admin;
    GRANT USAGE ON SEQUENCE pgfleet.collector_requests_id_seq TO pgfleet_admin;
END;
$$;
SELECT pgfleet.grant_admin();

-- Who registered each server, so that a discovery provider only ever updates
-- the rows it created.  Until now a static or file_sd target whose alias was
-- that of a server added by hand, or 'local', took the row over: its host and
-- credentials were replaced, and the new server's data continued the old
-- one's history.
--
-- provider (since 0003): NULL for the servers of 'pgfleet server add' and for
--   local (srvid 0), which no provider may write; 'static' or 'file_sd' for
--   the servers a provider registered.  A provider writes a row only if it is
--   its own: an alias taken by another (by hand, local, the other provider)
--   is a collision, logged by the collector, and changes nothing.  A server
--   may move between the files of its provider.
-- origin (new): where the provider found the server, for people: the
--   configuration file of a static server, the file of a file_sd one.

-- Existing rows keep their provider: one a provider took over before this
-- release cannot be told from one it created, and stays the provider's (see
-- docs/collector.md to check for those).  Values pgfleet never wrote are
-- read as "by hand": no provider will write those rows.
UPDATE pgfleet.servers SET provider = NULL
 WHERE provider IS NOT NULL AND provider NOT IN ('static', 'file_sd');

-- Local, taken over by a provider: given back the settings it was installed
-- with (local snapshots go through the repository connection anyway).
UPDATE pgfleet.servers
   SET provider = NULL, host = '', port = 5432, username = '', dbname = 'postgres',
       password_ref = NULL, options = '', frequency = 300, coalesce = 100
 WHERE srvid = 0 AND provider IS NOT NULL;

ALTER TABLE pgfleet.servers
    ADD COLUMN origin text,
    ADD CONSTRAINT servers_provider_check CHECK (provider IN ('static', 'file_sd')),
    ADD CONSTRAINT servers_local_by_hand CHECK (srvid <> 0 OR provider IS NULL);

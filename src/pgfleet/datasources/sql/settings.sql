-- A setting that may hold a secret leaves the server as a fingerprint of its
-- value, never the value: 'redacted sha256:' and 12 hex digits of the SHA-256
-- of the value keyed with the server's system identifier (not stored in the
-- repository, so that a list of guesses cannot be checked against it there).
-- A change of value still shows as a change; an empty value stays empty, and
-- so does archive_command's '(disabled)' (what PostgreSQL shows when
-- archive_mode is off, whatever the command).
-- Which: string settings named for a command (archive_command,
-- restore_command, archive_cleanup_command, recovery_end_command,
-- ssl_passphrase_command...), a conninfo (primary_conninfo) or a secret
-- (password, passphrase, secret, token, credential, salt, api_key...: an
-- extension's too), and any whose value holds a password=... or a URI with a
-- password.
SELECT pg_catalog.now() AS ts, s.name,
       CASE WHEN s.setting IN ('', '(disabled)') OR s.vartype <> 'string'
                 OR NOT (s.name ~* k.names OR s.setting ~* k.values)
            THEN s.setting
            ELSE 'redacted sha256:' || pg_catalog.substr(pg_catalog.encode(pg_catalog.sha256(
                     pg_catalog.convert_to(k.key || s.setting, pg_catalog.getdatabaseencoding())),
                     'hex'), 1, 12) END AS setting,
       s.unit, s.source, s.pending_restart,
       -- The number in base units, for the exporter: bytes for a memory
       -- setting (unit B, kB, MB, GB, TB, or blocks: 8kB...), seconds for a
       -- time (ms, s, min...), value for any other number and a boolean (1
       -- for on).  At most one is not NULL; all are for strings, enums and a
       -- unit not known here.
       CASE WHEN s.vartype = 'bool' THEN (CASE WHEN s.setting = 'on' THEN 1 ELSE 0 END)::double precision
            WHEN s.vartype IN ('integer', 'real') AND s.unit IS NULL THEN s.setting::double precision
       END AS value,
       CASE WHEN s.vartype IN ('integer', 'real') AND s.unit ~ '^[0-9]*(B|kB|MB|GB|TB)$' THEN
           s.setting::double precision
           * (CASE pg_catalog.ltrim(s.unit, '0123456789') WHEN 'B' THEN 1 WHEN 'kB' THEN 1024
                   WHEN 'MB' THEN 1048576 WHEN 'GB' THEN 1073741824
                   WHEN 'TB' THEN 1099511627776 END)::double precision
           * coalesce(nullif(pg_catalog.rtrim(s.unit, 'kMGTB'), ''), '1')::double precision
       END AS value_bytes,
       CASE WHEN s.vartype IN ('integer', 'real') THEN
           s.setting::double precision
           * (CASE s.unit WHEN 'us' THEN 0.000001 WHEN 'ms' THEN 0.001 WHEN 's' THEN 1
                          WHEN 'min' THEN 60 WHEN 'h' THEN 3600 WHEN 'd' THEN 86400 END)::double precision
       END AS value_seconds
  FROM pg_catalog.pg_settings s
 CROSS JOIN (SELECT c.system_identifier::pg_catalog.text || ':' AS key,
                    $re$(_command|_cmd|_script|[._]dsn)$|conninfo|connstr|connection_string|passw|passphrase|secret|token|credential|salt|api_?key|private_?key|access_?key$re$
                      AS names,
                    $re$(passw[a-z]*|passphrase|secret)[[:space:]]*=|://[^/@[:space:]]*:[^/@[:space:]]*@$re$
                      AS values
               FROM pg_catalog.pg_control_system() c) k
 WHERE s.source NOT IN ('client', 'session')

-- PostgreSQL 13 (pg_stat_statements 1.8): no toplevel (nested statements count with
-- their top-level twins under one entry), no pg_stat_statements_info (no reset time),
-- no temporary file timing nor JIT.
SELECT pg_catalog.now() AS ts, d.datname, r.rolname, true AS toplevel, s.queryid,
       NULL::pg_catalog.timestamptz AS stats_since,
       -- Utility statements keep their literals (CREATE ROLE ... PASSWORD 'x',
       -- CREATE SUBSCRIPTION ... CONNECTION '...', ALTER SYSTEM SET
       -- primary_conninfo = '...'): a literal after a word naming a secret, a
       -- conninfo or a command (a dollar-quoted one and all after it),
       -- password=... anywhere and the password of a URI become <redacted>
       -- here, before the text leaves the server.  The patterns are
       -- dollar-quoted: no standard_conforming_strings changes what they say.
       -- pg_stat_statements replaces the constants of plannable statements with
       -- $n: a secret can only be left in a literal or a comment, so a text with
       -- neither ('...', $tag$...$tag$, /* */, --) is kept as it is without a
       -- regular expression (memchr-cheap: most texts stop here).
       CASE WHEN (pg_catalog.strpos(s.query, '''') = 0 AND pg_catalog.strpos(s.query, '/*') = 0
                  AND pg_catalog.strpos(s.query, '--') = 0
                  AND s.query !~ $re$\$[A-Za-z_]*\$$re$)
                 OR s.query !~* $re$passw|passphrase|secret|conninfo|connection|_command|salt|token|://$re$
            THEN s.query
            ELSE pg_catalog.regexp_replace(pg_catalog.regexp_replace(pg_catalog.regexp_replace(
                   s.query,
                   $re$(passw[a-z]*|passphrase|secret[a-z_]*|conninfo|connection|_command|salt|token)(\s*=\s*|\s+to\s+|\s+)(?:[eE]?'(?:[^'\\]|''|\\.)*'|\$\w*\$.*)$re$,
                   $re$\1\2'<redacted>'$re$, 'gi'),
                   $re$(passw[a-z]*|passphrase)(\s*=\s*)(?!\$[0-9])[^\s',)]+$re$, $re$\1\2<redacted>$re$, 'gi'),
                   $re$(://[^:/@\s']*:)[^@/\s']*@$re$, $re$\1<redacted>@$re$, 'g')
       END AS query,
       s.calls, s.plans, s.rows,
       s.shared_blks_hit, s.shared_blks_read, s.shared_blks_dirtied, s.shared_blks_written,
       s.local_blks_hit, s.local_blks_read, s.local_blks_dirtied, s.local_blks_written,
       s.temp_blks_read, s.temp_blks_written,
       s.wal_records, s.wal_fpi,
       NULL::bigint AS jit_functions,
       s.wal_bytes,
       s.total_exec_time, s.total_plan_time,
       s.blk_read_time, s.blk_write_time,
       NULL::double precision AS temp_blk_read_time,
       NULL::double precision AS temp_blk_write_time,
       NULL::double precision AS jit_generation_time,
       -- Over the entry's life (since stats_since; min and max since the last
       -- minmax-only reset on 17+), not per snapshot: gauges.
       s.min_exec_time, s.max_exec_time, s.stddev_exec_time
  FROM @extschema:pg_stat_statements@.pg_stat_statements s
  JOIN pg_catalog.pg_database d ON d.oid = s.dbid
  JOIN pg_catalog.pg_roles r ON r.oid = s.userid
 WHERE s.queryid IS NOT NULL

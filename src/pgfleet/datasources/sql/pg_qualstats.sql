-- pg_qualstats 2.0.  The GROUP BY only guards the keys' uniqueness (NULL
-- queryid and uniquequalid become 0): the extension has one entry per key.
WITH q AS (
    SELECT q.userid, coalesce(q.queryid, 0) AS queryid, q.uniquequalnodeid,
           coalesce(q.uniquequalid, 0) AS uniquequalid, q.eval_type::text AS eval_type,
           min(q.qualnodeid) AS qualnodeid, min(q.constvalue::text) AS constvalue,
           min(q.lrelid) AS lrelid, min(q.lattnum) AS lattnum, min(q.opno) AS opno,
           min(q.rrelid) AS rrelid, min(q.rattnum) AS rattnum,
           sum(q.occurences)::bigint AS occurences,
           sum(q.execution_count)::bigint AS execution_count,
           sum(q.nbfiltered)::bigint AS nbfiltered
      FROM @extschema:pg_qualstats@.pg_qualstats() q
      JOIN pg_database d ON d.oid = q.dbid
     WHERE d.datname = current_database()
     GROUP BY q.userid, coalesce(q.queryid, 0), q.uniquequalnodeid,
              coalesce(q.uniquequalid, 0), q.eval_type
)
SELECT now() AS ts, current_database() AS datname, r.rolname, q.queryid,
       q.uniquequalnodeid, q.uniquequalid, q.eval_type, q.qualnodeid,
       CASE WHEN q.lrelid IS NULL THEN '?'
            ELSE coalesce(quote_ident(ln.nspname) || '.' || quote_ident(lc.relname) || '.'
                          || quote_ident(la.attname), q.lrelid || '.' || q.lattnum) END
       || ' ' || coalesce(o.oprname::text, q.opno::text) || ' ' ||
       CASE WHEN q.rrelid IS NULL THEN '?'
            ELSE coalesce(quote_ident(rn.nspname) || '.' || quote_ident(rc.relname) || '.'
                          || quote_ident(ra.attname), q.rrelid || '.' || q.rattnum) END AS qual,
       q.constvalue,
       q.occurences, q.execution_count, q.nbfiltered
  FROM q
  JOIN pg_roles r ON r.oid = q.userid
  LEFT JOIN pg_class lc ON lc.oid = q.lrelid
  LEFT JOIN pg_namespace ln ON ln.oid = lc.relnamespace
  LEFT JOIN pg_attribute la ON la.attrelid = q.lrelid AND la.attnum = q.lattnum
  LEFT JOIN pg_class rc ON rc.oid = q.rrelid
  LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
  LEFT JOIN pg_attribute ra ON ra.attrelid = q.rrelid AND ra.attnum = q.rattnum
  LEFT JOIN pg_operator o ON o.oid = q.opno

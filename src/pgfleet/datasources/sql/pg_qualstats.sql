-- pg_qualstats 2.0.  The GROUP BY only guards the keys' uniqueness (NULL
-- queryid and uniquequalid become 0): the extension has one entry per key.
-- A constant compared with a column whose name says it holds a secret
-- (password, token, api_key...) leaves the server as a fingerprint only.
WITH q AS (
    SELECT q.userid, coalesce(q.queryid, 0) AS queryid, q.uniquequalnodeid,
           coalesce(q.uniquequalid, 0) AS uniquequalid,
           q.eval_type::pg_catalog.text AS eval_type,
           pg_catalog.min(q.qualnodeid) AS qualnodeid,
           pg_catalog.min(q.constvalue::pg_catalog.text) AS constvalue,
           pg_catalog.min(q.lrelid) AS lrelid, pg_catalog.min(q.lattnum) AS lattnum,
           pg_catalog.min(q.opno) AS opno,
           pg_catalog.min(q.rrelid) AS rrelid, pg_catalog.min(q.rattnum) AS rattnum,
           pg_catalog.sum(q.occurences)::bigint AS occurences,
           pg_catalog.sum(q.execution_count)::bigint AS execution_count,
           pg_catalog.sum(q.nbfiltered)::bigint AS nbfiltered
      FROM @extschema:pg_qualstats@.pg_qualstats() q
      JOIN pg_catalog.pg_database d ON d.oid = q.dbid
     WHERE d.datname = pg_catalog.current_database()
     GROUP BY q.userid, coalesce(q.queryid, 0), q.uniquequalnodeid,
              coalesce(q.uniquequalid, 0), q.eval_type
)
SELECT pg_catalog.now() AS ts, pg_catalog.current_database() AS datname, r.rolname, q.queryid,
       q.uniquequalnodeid, q.uniquequalid, q.eval_type, q.qualnodeid,
       CASE WHEN q.lrelid IS NULL THEN '?'
            ELSE coalesce(pg_catalog.quote_ident(ln.nspname) || '.'
                          || pg_catalog.quote_ident(lc.relname) || '.'
                          || pg_catalog.quote_ident(la.attname),
                          q.lrelid::pg_catalog.text || '.' || q.lattnum::pg_catalog.text) END
       || ' ' || coalesce(o.oprname::pg_catalog.text, q.opno::pg_catalog.text) || ' ' ||
       CASE WHEN q.rrelid IS NULL THEN '?'
            ELSE coalesce(pg_catalog.quote_ident(rn.nspname) || '.'
                          || pg_catalog.quote_ident(rc.relname) || '.'
                          || pg_catalog.quote_ident(ra.attname),
                          q.rrelid::pg_catalog.text || '.' || q.rattnum::pg_catalog.text) END
         AS qual,
       CASE WHEN q.constvalue IS NULL OR q.constvalue = ''
                 OR NOT (coalesce(la.attname::pg_catalog.text, '') ~* k.names
                         OR coalesce(ra.attname::pg_catalog.text, '') ~* k.names)
            THEN q.constvalue
            ELSE 'redacted sha256:' || pg_catalog.substr(pg_catalog.encode(pg_catalog.sha256(
                     pg_catalog.convert_to(k.key || q.constvalue, pg_catalog.getdatabaseencoding())),
                     'hex'), 1, 12) END AS constvalue,
       q.occurences, q.execution_count, q.nbfiltered
  FROM q
  JOIN pg_catalog.pg_roles r ON r.oid = q.userid
  LEFT JOIN pg_catalog.pg_class lc ON lc.oid = q.lrelid
  LEFT JOIN pg_catalog.pg_namespace ln ON ln.oid = lc.relnamespace
  LEFT JOIN pg_catalog.pg_attribute la ON la.attrelid = q.lrelid AND la.attnum = q.lattnum
  LEFT JOIN pg_catalog.pg_class rc ON rc.oid = q.rrelid
  LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
  LEFT JOIN pg_catalog.pg_attribute ra ON ra.attrelid = q.rrelid AND ra.attnum = q.rattnum
  LEFT JOIN pg_catalog.pg_operator o ON o.oid = q.opno
 CROSS JOIN (SELECT s.system_identifier::pg_catalog.text || ':' AS key,
                    'passw|passphrase|secret|token|credential|salt|api_?key|private_?key|access_?key'
                      AS names
               FROM pg_catalog.pg_control_system() s) k

SELECT pg_catalog.now() AS ts, event_type, event, queryid,
       pg_catalog.sum(count)::bigint AS count
  FROM (SELECT coalesce(event_type, '') AS event_type, coalesce(event, '') AS event,
               coalesce(queryid, 0) AS queryid, count
          FROM @extschema:pg_wait_sampling@.pg_wait_sampling_profile) p
 GROUP BY event_type, event, queryid

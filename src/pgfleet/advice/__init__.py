"""From charts to answers: advice computed on a monitored server, on demand.

- :mod:`~pgfleet.advice.indexes`: indexes to create, from the predicates
  pg_qualstats collected, checked against the server's catalog and verified
  with hypopg's hypothetical indexes;
- :mod:`~pgfleet.advice.plans`: the generic plan of a normalized statement;
- :mod:`~pgfleet.advice.explain`: the one way either of them runs a statement
  text from a monitored server: explained, never executed, in a read-only
  transaction with a timeout (the security model is there, and in
  docs/advice.md);
- :mod:`~pgfleet.advice.quals`: I/O-free: predicates parsed and grouped into
  index candidates, and what makes an existing index cover a candidate;
- :mod:`~pgfleet.advice.catalog`: what index advice reads of the monitored
  database's catalog (columns, operator classes, indexes, extensions).

Everything here returns a result object carrying a reason when it could not
do its job (an extension missing, a server out of reach, a statement
refused), never a traceback: the web pages show the reason.
"""

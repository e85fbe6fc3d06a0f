"""Which datasource column becomes which Prometheus family: declarations only.

One :class:`View` per family group of a built-in source.  A leaf: both
:mod:`.latest` (which columns to parse and keep) and :mod:`.fleet` (which
families to yield) read this table, and neither imports the other for it.
Counters are named without ``_total``; times are converted from
PostgreSQL's milliseconds to seconds.  docs/metrics.md lists the families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "pgfleet_"
MS = 0.001  # PostgreSQL's times are milliseconds

Parse = Literal["num", "bool", "time"]


@dataclass(frozen=True)
class Series:
    """One column of a source exported as (part of) a family.

    ``family`` is relative to its view's prefix and defaults to the column's
    name; counters are named without ``_total``.  Several columns may feed
    one family, told apart by constant ``labels`` (the lag of each
    replication stage, say).
    """

    column: str
    help: str
    family: str = ""
    scale: float = 1.0
    # "bool": t/f as 1/0; "time": a timestamptz as Unix seconds.
    parse: Parse = "num"
    labels: tuple[tuple[str, str], ...] = ()
    # How entries merged into one (see View.labels) combine.
    merge: Literal["sum", "max"] = "sum"
    # A gauge that is ``column`` divided by this column, both as the source
    # says them (not the exported counters): pg_stat_statements' mean time is
    # total_exec_time / calls, so it need not be fetched nor stored.  NaN
    # (no sample) when the divisor is 0 or NULL.  Not in a merged view.
    divide: str = ""


def _c(column: str, help: str, family: str = "", **labels: str) -> Series:
    return Series(column, help, family, labels=tuple(labels.items()))


def _ms(column: str, help: str, family: str) -> Series:
    return Series(column, help, family, scale=MS)


def _ts(column: str, help: str, family: str) -> Series:
    return Series(column, help, family, parse="time")


@dataclass(frozen=True)
class View:
    """How one built-in source becomes families: one entry per distinct label set.

    ``labels`` maps label names to source columns; rows of the source that
    share those columns are merged into one entry (their other key columns
    summed over).  ``cap`` names the setting bounding the entries per server,
    the most active first by the sum of the ``rank`` columns (cumulative
    counters, so the ranking moves slowly and series do not churn).
    """

    module: str
    prefix: str
    labels: tuple[tuple[str, str], ...]
    counters: tuple[Series, ...] = ()
    gauges: tuple[Series, ...] = ()
    # Rows kept: (column, value, equal) -- equal False keeps the others.
    where: tuple[str, str, bool] | None = None
    cap: Literal["statements", "tables"] | None = None
    rank: tuple[str, ...] = ()
    # (family, help, column, label, max characters): a gauge of 1 per entry
    # whose label carries a text too long or varied to repeat on every series.
    info: tuple[str, str, str, str, int] | None = None
    # The info text of an entry is kept from its first snapshot (a statement's
    # text never changes), unless it moves on: read again at every one (a
    # vacuum's phase).
    info_moves: bool = False
    # Entries whose values are all 0 or NULL are left out until one is not
    # (as counters are monotonic, they do not come and go).
    sparse: bool = False

    @property
    def series(self) -> tuple[Series, ...]:
        """Counters, then gauges: the order of an entry's values."""
        return self.counters + self.gauges

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.labels)

    def family(self, s: Series) -> str:
        return self.prefix + (s.family or s.column)


_CONFLICT = "Queries cancelled on a standby by a conflict with recovery, per reason."
_LAG_BYTES = "How far a standby is behind this server, in WAL bytes, per stage."
_LAG_SECONDS = "How long a standby took to confirm recent WAL, per stage."

VIEWS: tuple[View, ...] = (
    View(
        "pg_stat_database",
        "database_",
        (("dbname", "datname"),),
        counters=(
            _c("xact_commit", "Transactions committed."),
            _c("xact_rollback", "Transactions rolled back."),
            _c("blks_read", "Blocks read from outside shared buffers."),
            _c("blks_hit", "Blocks found in shared buffers."),
            _c("tup_returned", "Tuples returned by scans."),
            _c("tup_fetched", "Tuples fetched by index scans."),
            _c("tup_inserted", "Tuples inserted."),
            _c("tup_updated", "Tuples updated."),
            _c("tup_deleted", "Tuples deleted."),
            _c("temp_files", "Temporary files created by queries."),
            _c("temp_bytes", "Bytes written to temporary files."),
            _c("deadlocks", "Deadlocks detected."),
            *(
                _c(f"confl_{r}", _CONFLICT, "conflicts", reason=r)
                for r in ("tablespace", "lock", "snapshot", "bufferpin", "deadlock")
            ),
            _c("confl_active_logicalslot", _CONFLICT, "conflicts", reason="active_logicalslot"),
            _c("checksum_failures", "Data page checksum failures."),
            _ms("blk_read_time", "Time reading blocks (track_io_timing).", "blk_read_seconds"),
            _ms("blk_write_time", "Time writing blocks (track_io_timing).", "blk_write_seconds"),
            _c("sessions", "Sessions established."),
            _c("sessions_abandoned", "Sessions whose client vanished without a goodbye."),
            _c("sessions_fatal", "Sessions ended by a fatal error."),
            _c("sessions_killed", "Sessions terminated by an operator."),
            _ms("session_time", "Time spent by sessions.", "session_seconds"),
            _ms("active_time", "Time spent executing statements.", "active_seconds"),
            _ms(
                "idle_in_transaction_time",
                "Time spent idle in a transaction.",
                "idle_in_transaction_seconds",
            ),
        ),
        gauges=(
            _c("numbackends", "Backends connected to the database.", "backends"),
            _c("xid_age", "Transactions since the oldest unfrozen one (datfrozenxid)."),
            _c("mxid_age", "Multixacts since the oldest unfrozen one (datminmxid)."),
        ),
    ),
    View(
        "database_size",
        "database_",
        (("dbname", "datname"),),
        gauges=(
            _c("size", "Pages of its relations, as of their last VACUUM/ANALYZE, in bytes.",
               "size_bytes"),
        ),
    ),
    View(
        "pg_locks",
        "locks_",
        (("dbname", "datname"), ("mode", "mode")),
        gauges=(
            _c("granted", "Locks held, per database and mode.", "held"),
            _c("waiting", "Locks awaited, per database and mode."),
            _c("longest_wait_seconds", "How long the oldest wait for such a lock has lasted."),
        ),
    ),
    View(
        "postmaster",
        "",
        (),
        gauges=(
            _ts("start_time", "When the server started.", "postmaster_start_timestamp_seconds"),
            _ts(
                "conf_load_time",
                "When the server last loaded its configuration files.",
                "config_load_timestamp_seconds",
            ),
        ),
    ),
    View(
        "settings",
        "",
        (("name", "name"),),
        gauges=(
            _c("value", "A numeric or boolean (1: on) setting not at its default.", "setting"),
            _c("value_bytes", "A memory setting not at its default, in bytes.", "setting_bytes"),
            _c("value_seconds", "A time setting not at its default, in seconds.",
               "setting_seconds"),
        ),
        # About 270 numeric and boolean settings: those at PostgreSQL's
        # built-in default would be most of a server's series.
        where=("source", "default", False),
    ),
    View(
        "pg_stat_activity",
        "",
        (
            ("backend_type", "backend_type"),
            ("dbname", "datname"),
            ("user", "usename"),
            ("state", "state"),
        ),
        gauges=(_c("count", "Server processes, per type, database, user and state.", "backends"),),
    ),
    View(
        "pg_stat_activity",
        "",
        (("wait_event_type", "wait_event_type"), ("wait_event", "wait_event")),
        gauges=(_c("count", "Server processes waiting, per wait event.", "backends_waiting"),),
        where=("wait_event_type", "", False),
    ),
    View(
        "pg_stat_activity",
        "",
        (("dbname", "datname"),),
        gauges=(
            Series(
                "oldest_xact_seconds",
                "Age of the oldest open transaction in the database.",
                "oldest_xact_age_seconds",
                merge="max",
            ),
        ),
    ),
    View(
        "pg_stat_bgwriter",
        "",
        (),
        counters=(
            _c("checkpoints_timed", "Checkpoints started by checkpoint_timeout."),
            _c("checkpoints_req", "Checkpoints requested.", "checkpoints_requested"),
            _c("checkpoints_done", "Checkpoints completed (18+)."),
            _c("restartpoints_timed", "Restartpoints started by checkpoint_timeout (17+)."),
            _c("restartpoints_req", "Restartpoints requested (17+).", "restartpoints_requested"),
            _c("restartpoints_done", "Restartpoints completed (17+)."),
            _c(
                "buffers_checkpoint",
                "Buffers written by checkpoints.",
                "checkpoint_buffers_written",
            ),
            _c(
                "slru_written",
                "SLRU buffers written by checkpoints (18+).",
                "checkpoint_slru_written",
            ),
            _ms("checkpoint_write_time", "Time writing checkpoints.", "checkpoint_write_seconds"),
            _ms("checkpoint_sync_time", "Time syncing checkpoints.", "checkpoint_sync_seconds"),
            _c(
                "buffers_clean",
                "Buffers written by the background writer.",
                "bgwriter_buffers_written",
            ),
            _c(
                "maxwritten_clean",
                "Background writer rounds stopped at bgwriter_lru_maxpages.",
                "bgwriter_maxwritten_clean",
            ),
            _c(
                "buffers_backend",
                "Buffers written by backends (before 17).",
                "backend_buffers_written",
            ),
            _c("buffers_backend_fsync", "Fsyncs done by backends (before 17).", "backend_fsyncs"),
            _c("buffers_alloc", "Shared buffers allocated.", "buffers_allocated"),
        ),
    ),
    View(
        "pg_stat_wal",
        "",
        (),
        counters=(
            _c("wal_records", "WAL records generated."),
            _c("wal_fpi", "WAL full page images generated."),
            _c("wal_bytes", "WAL generated, in bytes."),
            _c("wal_buffers_full", "WAL writes forced by full WAL buffers."),
            _c("wal_write", "WAL writes (before 18).", "wal_writes"),
            _c("wal_sync", "WAL syncs (before 18).", "wal_syncs"),
            _ms("wal_write_time", "Time writing WAL (before 18).", "wal_write_seconds"),
            _ms("wal_sync_time", "Time syncing WAL (before 18).", "wal_sync_seconds"),
        ),
    ),
    View(
        "pg_stat_io",
        "io_",
        (("backend_type", "backend_type"), ("object", "object"), ("context", "context")),
        counters=(
            _c("reads", "Read operations."),
            _c("read_bytes", "Bytes read."),
            _ms("read_time", "Time reading (track_io_timing).", "read_seconds"),
            _c("writes", "Write operations."),
            _c("write_bytes", "Bytes written."),
            _ms("write_time", "Time writing (track_io_timing).", "write_seconds"),
            _c("extends", "Relation extend operations."),
            _c("extend_bytes", "Bytes added by extends."),
            _c("hits", "Blocks found in shared buffers."),
            _c("evictions", "Blocks evicted from a buffer to reuse it."),
            _c("fsyncs", "Fsync calls."),
            _ms("fsync_time", "Time in fsync calls (track_io_timing).", "fsync_seconds"),
        ),
        # Most (backend type, object, context) rows never see any I/O: 10 of
        # 79 on an idle PostgreSQL 18.
        sparse=True,
    ),
    View(
        "pg_stat_archiver",
        "archiver_",
        (),
        counters=(
            _c("archived_count", "WAL files archived.", "archived"),
            _c("failed_count", "Failed attempts to archive a WAL file.", "failed"),
        ),
        gauges=(
            _ts(
                "last_archived_time",
                "When a WAL file was last archived.",
                "last_archived_timestamp_seconds",
            ),
            _ts("last_failed_time", "When archiving last failed.", "last_failed_timestamp_seconds"),
        ),
    ),
    View(
        "replication",
        "replication_",
        (("application_name", "application_name"), ("client_addr", "client_addr")),
        gauges=(
            *(
                _c(f"{stage}_lag_bytes", _LAG_BYTES, "lag_bytes", stage=stage)
                for stage in ("sent", "write", "flush", "replay")
            ),
            *(
                _c(f"{stage}_lag", _LAG_SECONDS, "lag_seconds", stage=stage)
                for stage in ("write", "flush", "replay")
            ),
        ),
    ),
    View(
        "wal_receiver",
        "wal_receiver_",
        (),
        gauges=(
            _c("receive_lag_bytes", "WAL the sender has that this standby has not flushed."),
            _c("replay_lag_bytes", "WAL flushed on this standby and not yet replayed."),
            _c("replay_lag", "Age of the last transaction replayed.", "replay_lag_seconds"),
        ),
    ),
    View(
        "replication_slots",
        "replication_slot_",
        (("slot_name", "slot_name"), ("slot_type", "slot_type")),
        gauges=(
            _c("retained_bytes", "WAL the slot holds back, in bytes."),
            _c("confirmed_flush_lag_bytes", "WAL a logical slot's consumer has not confirmed."),
            _c("safe_wal_size", "WAL writable before the slot is lost.", "safe_wal_size_bytes"),
            Series("active", "1 if a consumer is connected to the slot.", parse="bool"),
            _c("xmin_age", "Age in transactions of the xmin the slot holds back."),
            _c("catalog_xmin_age", "Age in transactions of the catalog xmin it holds back."),
        ),
    ),
    View(
        "pg_stat_user_tables",
        "table_",
        (("dbname", "datname"), ("schema", "schemaname"), ("table", "relname")),
        counters=(
            _c("seq_scan", "Sequential scans.", "seq_scans"),
            _c("seq_tup_read", "Tuples read by sequential scans."),
            _c("idx_scan", "Index scans.", "idx_scans"),
            _c("idx_tup_fetch", "Tuples fetched by index scans."),
            _c("n_tup_ins", "Tuples inserted.", "tup_inserted"),
            _c("n_tup_upd", "Tuples updated.", "tup_updated"),
            _c("n_tup_del", "Tuples deleted.", "tup_deleted"),
            _c("n_tup_hot_upd", "Tuples updated without index changes (HOT).", "tup_hot_updated"),
            _c("vacuum_count", "Manual vacuums.", "vacuums"),
            _c("autovacuum_count", "Autovacuums.", "autovacuums"),
            _c("analyze_count", "Manual analyzes.", "analyzes"),
            _c("autoanalyze_count", "Autoanalyzes.", "autoanalyzes"),
            _c("heap_blks_read", "Heap blocks read from outside shared buffers."),
            _c("heap_blks_hit", "Heap blocks found in shared buffers."),
        ),
        gauges=(
            _c("n_live_tup", "Estimated live tuples.", "live_tuples"),
            _c("n_dead_tup", "Estimated dead tuples.", "dead_tuples"),
            _c("size", "Size with TOAST and maps, in bytes.", "size_bytes"),
            _ts("last_vacuum", "Last manual vacuum.", "last_vacuum_timestamp_seconds"),
            _ts("last_autovacuum", "Last autovacuum.", "last_autovacuum_timestamp_seconds"),
            _ts("last_analyze", "Last manual analyze.", "last_analyze_timestamp_seconds"),
            _ts("last_autoanalyze", "Last autoanalyze.", "last_autoanalyze_timestamp_seconds"),
        ),
        cap="tables",
        rank=("seq_tup_read", "idx_tup_fetch", "n_tup_ins", "n_tup_upd", "n_tup_del"),
    ),
    View(
        "pg_stat_user_indexes",
        "index_",
        (
            ("dbname", "datname"),
            ("schema", "schemaname"),
            ("table", "relname"),
            ("index", "indexrelname"),
        ),
        counters=(
            _c("idx_scan", "Scans of the index.", "scans"),
            _c("idx_tup_read", "Index entries returned by scans.", "tup_read"),
            _c("idx_tup_fetch", "Table rows fetched by simple scans of the index.", "tup_fetch"),
            _c("idx_blks_read", "Index blocks read from outside shared buffers.", "blks_read"),
            _c("idx_blks_hit", "Index blocks found in shared buffers.", "blks_hit"),
        ),
        gauges=(_c("size", "Index size, in bytes.", "size_bytes"),),
        cap="tables",
        rank=("idx_scan", "idx_tup_read"),
    ),
    View(
        "pg_stat_progress_vacuum",
        "vacuum_",
        (("dbname", "datname"), ("schema", "schemaname"), ("table", "relname")),
        gauges=(
            _c("heap_blks_total", "Blocks of the table to scan.", "heap_blocks"),
            _c("heap_blks_scanned", "Blocks scanned so far.", "heap_blocks_scanned"),
            _c("heap_blks_vacuumed", "Blocks vacuumed so far.", "heap_blocks_vacuumed"),
            _c("index_vacuum_count", "Passes over the indexes so far.", "index_passes"),
            _c("indexes_total", "Indexes to process (17+).", "indexes"),
            _c("indexes_processed", "Indexes processed so far (17+)."),
            _c("dead_tuples", "Dead tuples (item IDs on 17+) collected since the last index pass."),
            _c("max_dead_tuples", "Dead tuples that fit before an index pass (before 17)."),
            _c("dead_tuple_bytes", "Memory the dead tuples take (17+)."),
            _c("max_dead_tuple_bytes", "Memory they may take before an index pass (17+)."),
            _ts("started", "When the vacuum of the table started.", "start_timestamp_seconds"),
            Series("autovacuum", "1 for an autovacuum worker, 0 for a VACUUM command.",
                   parse="bool"),
            Series("wraparound", "1 for an autovacuum to prevent wraparound.", parse="bool"),
        ),
        info=("vacuum_info", "1 per vacuum running; phase is where it is.", "phase", "phase", 64),
        info_moves=True,
    ),
    View(
        "pg_stat_statements",
        "statement_",
        (("dbname", "datname"), ("user", "rolname"), ("queryid", "queryid")),
        counters=(
            _c("calls", "Executions."),
            _ms("total_exec_time", "Time executing.", "exec_seconds"),
            _ms("total_plan_time", "Time planning (track_planning).", "plan_seconds"),
            _c("rows", "Rows retrieved or affected."),
            _c("shared_blks_hit", "Shared blocks found in shared buffers."),
            _c("shared_blks_read", "Shared blocks read from outside shared buffers."),
            _c("shared_blks_written", "Shared blocks written."),
            _c("temp_blks_written", "Temporary blocks written."),
            _c("wal_bytes", "WAL generated, in bytes."),
        ),
        # Over the entry's life, not per interval (docs/metrics.md).
        gauges=(
            _ms("min_exec_time", "Shortest execution.", "exec_min_seconds"),
            _ms("max_exec_time", "Longest execution.", "exec_max_seconds"),
            Series(
                "total_exec_time", "Mean execution time.", "exec_mean_seconds", MS, divide="calls"
            ),
            _ms("stddev_exec_time", "Standard deviation of execution time.", "exec_stddev_seconds"),
        ),
        # Nested statements' time is already in their top-level caller's:
        # keeping top-level entries only keeps sums over statements true.
        where=("toplevel", "t", True),
        cap="statements",
        rank=("total_exec_time", "total_plan_time"),
        info=(
            "statement_info",
            "1 per exported statement; query is the start of its normalized text.",
            "query",
            "query",
            120,
        ),
    ),
    View(
        "pg_wait_sampling",
        "",
        (("wait_event_type", "event_type"), ("wait_event", "event")),
        counters=(_c("count", "Samples of processes waiting, per event.", "wait_event_samples"),),
    ),
)  # fmt: skip

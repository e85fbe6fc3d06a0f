"""contrib/prometheus/pgfleet-backup.rules.yml: valid for promtool, and firing when it should.

``promtool check rules`` on the file, then ``promtool test rules`` on made-up
series: each alert fires where it must and stays quiet where it must not.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

PROMTOOL = shutil.which("promtool") or (
    "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
)
RULES = Path(__file__).parents[2] / "contrib" / "prometheus" / "pgfleet-backup.rules.yml"

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus)"
)


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    res = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    return out


def test_promtool_checks_the_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert "SUCCESS: 3 rules found" in out, out


# Times are minutes; a daily schedule (interval 86400 s).  db1 is fine; db2's
# last backup is 37 hours old; db3's receiver is down and it has no valid backup.
TESTS = """
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'pgfleet_backup_last_success_timestamp_seconds{{server="db1"}}'
        values: '0x60'
      - series: 'pgfleet_backup_interval_seconds{{server="db1"}}'
        values: '86400x60'
      - series: 'pgfleet_backup_last_success_timestamp_seconds{{server="db2"}}'
        values: '-133200x60'
      - series: 'pgfleet_backup_interval_seconds{{server="db2"}}'
        values: '86400x60'
      - series: 'pgfleet_backup_wal_receiver_up{{server="db1"}}'
        values: '1x60'
      - series: 'pgfleet_backup_wal_receiver_up{{server="db3"}}'
        values: '1 1 0x60'
      - series: 'pgfleet_backup_backups{{server="db1",state="valid"}}'
        values: '3x120'
      - series: 'pgfleet_backup_backups{{server="db3",state="valid"}}'
        values: '0x120'
      - series: 'pgfleet_backup_backups{{server="db3",state="invalid"}}'
        values: '2x120'
    alert_rule_test:
      - eval_time: 10m
        alertname: PgfleetBackupStale
        exp_alerts: []
      - eval_time: 20m
        alertname: PgfleetBackupStale
        exp_alerts:
          - exp_labels: {{severity: warning, server: db2}}
            exp_annotations:
              summary: "No recent backup of db2"
              description: "The newest valid backup of db2 finished 1d 13h 20m 0s ago, more than 1.5 schedule periods: see pgfleet_backup_runs_total{{outcome=\\"failed\\"}}, `pgfleet ctl backup status db2` and the log of ."
      - eval_time: 11m
        alertname: PgfleetWalStreamingDown
        exp_alerts: []
      - eval_time: 13m
        alertname: PgfleetWalStreamingDown
        exp_alerts:
          - exp_labels: {{severity: critical, server: db3}}
            exp_annotations:
              summary: "WAL of db3 is not streamed to its backups"
              description: "The WAL receiver of db3 on  has not streamed for 10 minutes: point-in-time recovery stops at its last segment, and the server holds its WAL for the replication slot (see `pgfleet ctl backup status db3`)."
      - eval_time: 59m
        alertname: PgfleetNoValidBackup
        exp_alerts: []
      - eval_time: 61m
        alertname: PgfleetNoValidBackup
        exp_alerts:
          - exp_labels: {{severity: critical, server: db3, state: valid}}
            exp_annotations:
              summary: "db3 has no valid backup"
              description: "No valid base backup of db3 for an hour: it cannot be restored (see `pgfleet ctl backup status db3` and pgfleet_backup_runs_total{{outcome=\\"failed\\"}})."
"""


def test_the_alerts_fire_when_they_should(tmp_path: Path) -> None:
    tests = tmp_path / "pgfleet-backup.rules.test.yml"
    tests.write_text(textwrap.dedent(TESTS).format(rules=RULES))
    out = promtool("test", "rules", str(tests))
    assert "SUCCESS" in out, out

"""The collector's Prometheus exporter: the fleet's latest statistics and the collector's health.

Built from memory on every scrape with prometheus_client collectors; see
docs/metrics.md for the families.
"""

from __future__ import annotations

from pgfleet.collector.exporter.fleet import FleetCollector
from pgfleet.collector.exporter.latest import Latest

__all__ = ["FleetCollector", "Latest"]

"""Slots, backoff and the in-flight limit: no I/O, no clusters."""

from __future__ import annotations

import asyncio
import statistics

from pgfleet.collector.scheduler import Backoff, Limiter, next_due, phase, slot_at_or_before, spread


def test_phases_spread_a_fleet_over_the_period() -> None:
    phases = [phase(f"db{i}", 60) for i in range(1000)]
    assert all(0 <= p < 60 for p in phases)
    # Roughly uniform: every 6-second tenth of the period gets its share.
    tenths = [sum(1 for p in phases if k * 6 <= p < (k + 1) * 6) for k in range(10)]
    assert min(tenths) > 60, tenths
    assert phase("db1", 60) == phase("db1", 60)  # stable across runs and collectors
    assert len({spread(f"db{i}", 10) for i in range(100)}) == 10


def test_next_due_takes_a_late_snapshot_once() -> None:
    f, off = 10.0, 3.0
    # No snapshot yet: the next slot ahead.
    assert next_due(100.0, None, f, off) == 103.0
    assert next_due(103.0, None, f, off) == 103.0
    # On time: the slot after the last one.
    assert next_due(104.0, 103.0, f, off) == 113.0
    # 35 s late: three slots missed, one snapshot, for the latest.
    assert next_due(148.0, 103.0, f, off) == 143.0
    assert slot_at_or_before(148.0, f, off) == 143.0


def test_backoff_grows_with_jitter_up_to_its_cap() -> None:
    b = Backoff(cap=8)
    delays = [b.next() for _ in range(8)]
    assert 0.5 <= delays[0] <= 1
    assert 1 <= delays[1] <= 2
    assert all(4 <= d <= 8 for d in delays[4:])
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered
    b.reset()
    assert b.next() <= 1
    many = [Backoff(cap=60).next() for _ in range(200)]
    assert statistics.pstdev(many) > 0.05


def test_limiter_bounds_and_resizes() -> None:
    async def main() -> list[int]:
        lim = Limiter(2)
        peak: list[int] = []

        async def job() -> None:
            async with lim:
                peak.append(lim.active)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(job() for _ in range(10)))
        assert max(peak) == 2
        await lim.resize(5)
        peak.clear()
        await asyncio.gather(*(job() for _ in range(10)))
        # A holder cancelled while holding gives its place back.
        task = asyncio.create_task(job())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert lim.active == 0
        return peak

    assert max(asyncio.run(main())) == 5

"""ReplayQueue: scored groups between the reward pool and the learner.

Bounded (capacity in groups; `put` waits while full, which is the engines' backpressure), version
aware (a group older than the learner by more than `max_staleness_versions` is discarded as stale),
and signal aware (tied groups carry no gradient: with `filter_tied` they are dropped and counted
instead of being handed to the learner).
"""

from __future__ import annotations

import asyncio
from collections import deque

import ray

from cluster.records import ScoredGroup


@ray.remote(num_cpus=0)
class ReplayQueue:
    def __init__(self, capacity_groups: int, max_staleness_versions: int, filter_tied: bool) -> None:
        self.capacity = capacity_groups
        self.max_staleness = max_staleness_versions
        self.filter_tied = filter_tied
        self.groups: deque[ScoredGroup] = deque()
        self.changed = asyncio.Condition()
        self.counts = {"put": 0, "taken": 0, "dropped_tied": 0, "dropped_stale": 0}
        # Where the learner stands, for the producer's admission rule (cluster.pipeline.admissible_groups):
        # the version of its latest take and how many groups it has taken at that version.
        self.take_version: int | None = None
        self.taken_at_version = 0

    def __repr__(self) -> str:  # the Ray dashboard's Repr column
        return (
            f"ReplayQueue(capacity {self.capacity} groups, max staleness {self.max_staleness} versions, "
            f"{'drops' if self.filter_tied else 'keeps'} tied groups)"
        )

    def node(self) -> str:
        """The Ray node id this queue runs on (actors.json: the driver's node, see RunActors.start)."""
        return ray.get_runtime_context().get_node_id()

    async def put(self, groups: list[ScoredGroup]) -> int:
        """Add groups; tied ones are dropped here when filtering. Returns how many were kept."""
        kept = 0
        for g in groups:
            self.counts["put"] += 1
            if self.filter_tied and g.tied:
                self.counts["dropped_tied"] += 1
                continue
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.groups) < self.capacity)
                self.groups.append(g)
                kept += 1
                self.changed.notify_all()
        return kept

    async def take(self, n: int, learner_version: int, timeout_s: float | None = None) -> list[ScoredGroup]:
        """Up to n groups at most `max_staleness_versions` behind `learner_version`, oldest first.

        Waits until n are there or `timeout_s` passes (None: return what is there now).
        """
        out: list[ScoredGroup] = []

        def fill() -> bool:
            while self.groups and len(out) < n:
                g = self.groups.popleft()
                if learner_version - g.version > self.max_staleness:
                    self.counts["dropped_stale"] += 1
                    continue
                out.append(g)
            return len(out) >= n

        async with self.changed:
            if timeout_s is None:
                fill()
            else:
                try:
                    await asyncio.wait_for(self.changed.wait_for(fill), timeout_s)
                except asyncio.TimeoutError:
                    pass
            self.changed.notify_all()
        self.counts["taken"] += len(out)
        if learner_version != self.take_version:
            self.take_version, self.taken_at_version = learner_version, 0
        self.taken_at_version += len(out)
        return out

    def admission(self) -> dict[str, int]:
        """What the producer's admission rule needs: groups queued, groups the learner has taken at the
        version of its latest take, and how many put groups survived the tied filter so far."""
        return {
            "queued": len(self.groups),
            "taken_at_version": self.taken_at_version,
            "put": self.counts["put"],
            "kept": self.counts["put"] - self.counts["dropped_tied"],
        }

    def stats(self) -> dict[str, int]:
        return {**self.counts, "depth": len(self.groups)}

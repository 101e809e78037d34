"""RewardWorker: one Ray actor that owns one verifier sandbox (one child process).

The actor itself never parses untrusted text: it hands each item to its Sandbox, whose child is
killed and replaced past the time limit, so an actor call returns within about
len(items) × timeout_s even on hostile input. The RewardPool replaces the actor if it dies.
"""

from __future__ import annotations

import os

import ray

from cluster.records import VerifyItem, VerifyResult
from rewards.sandbox import Sandbox


@ray.remote(max_restarts=0, max_task_retries=0)
class RewardWorker:
    """Scores chunks of items sequentially in its own sandbox child.

    Ray restarts are off on purpose: the pool replaces a dead worker itself, so it knows which
    items were in flight and retries them exactly once, and logs the replacement.
    """

    def __init__(self, cfg: dict, index: int = 0, start: int = 1) -> None:
        from cluster.config import RewardsConfig
        from cluster.naming import node_address

        self.index, self.start, self.node = index, start, node_address()
        self.sandbox = Sandbox(RewardsConfig.model_validate(cfg)).start()

    def __repr__(self) -> str:  # the Ray dashboard's Repr column (taken once, after __init__)
        again = f", start {self.start} of its slot" if self.start > 1 else ""
        return f"RewardWorker(reward worker {self.index}{again}, node {self.node})"

    def ready(self) -> dict:
        """Answered once the sandbox child is warm: the pool waits on it before the first batch."""
        return {"index": self.index, "pid": os.getpid(), "child_pid": self.sandbox.child_pid}

    def score(self, items: list[VerifyItem]) -> list[VerifyResult]:
        """One result per item, same order; bounded in time by the sandbox."""
        return self.sandbox.run_many(items)

    def stats(self) -> dict:
        return dict(self.sandbox.stats, index=self.index, pid=os.getpid())

    def close(self) -> None:
        self.sandbox.close()

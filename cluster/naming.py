"""Names and reprs of a run's Ray actors, for the Ray dashboard's Actors page and `ray list actors`.

Ray keeps an actor's name unique among the live actors of its namespace, and a driver that names no
namespace (duet-rl's) gets an anonymous one of its own: a resumed run, or a second run submitted to the same
cluster, is another job and cannot meet this one's names. Within one driver the names still have to differ:
- engines: a replacement takes a new engine id (RolloutFleet.next_id), so `engine-3` replaces `engine-0`;
- reward workers and learner ranks: a replacement keeps its slot and counts up its start, `reward-worker-1`
  then `reward-worker-1.2` (the dead one's name is not free until Ray has declared it dead, which after a
  node's loss takes its heartbeat timeout: taking the same name again would raise in `.remote()`);
- several runs in one driver (benchmarks, tests): each run's scope is its run folder's name, and a scope
  used twice in a process gets `#2`, `#3`.
The reprs say what a user searches for (engine 0 and its version, learner rank 0 and its node, reward
worker 1). Ray takes an actor's repr once, right after its `__init__` (the creation task's reply carries it to
the GCS; later calls do not refresh it), so a repr holds start-time facts: an engine's "started at version
N" is the policy it loaded, and a replacement engine, started at the current version, says which.
"""

from __future__ import annotations

import itertools
import os
import threading

_lock = threading.Lock()
_scopes: dict[str, int] = {}
_anonymous = itertools.count(1)


def run_scope(run_name: str | None = None) -> str:
    """A name prefix unique in this process: `run_name` (a run folder's name, "eval"), or one made up."""
    base = run_name or f"duet-{os.getpid()}-{next(_anonymous)}"
    with _lock:
        n = _scopes[base] = _scopes.get(base, 0) + 1
    return base if n == 1 else f"{base}#{n}"


def actor_name(scope: str, kind: str, index: int | str) -> str:
    """`<scope>/<kind>-<index>`, e.g. `20261205-101500/engine-0`."""
    return f"{scope}/{kind}-{index}"


class SlotNames:
    """Names for actors that are replaced in their slot: the first start is `<kind>-<slot>`, later ones
    `<kind>-<slot>.<start>`."""

    def __init__(self, scope: str, kind: str) -> None:
        self.scope, self.kind = scope, kind
        self._starts: dict[int, int] = {}
        self._lock = threading.Lock()

    def next(self, slot: int) -> tuple[str, int]:
        """The name of the next actor started in `slot`, and its start number (1 for the first)."""
        with self._lock:
            n = self._starts[slot] = self._starts.get(slot, 0) + 1
        return actor_name(self.scope, self.kind, slot if n == 1 else f"{slot}.{n}"), n


def node_address() -> str:
    """This actor's node address (for reprs); empty outside Ray."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return ""

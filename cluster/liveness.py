"""Ask several actors at once, with one deadline, and tell the dead from the slow; and wait for actors
being started, starting again those lost with their node before they were ready.

`ray.get` on a list raises on the first failure and `ray.wait` says only what is ready, so the
per-actor verdict that fault handling needs (answered / dead / silent) is written here, once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import ray

K = TypeVar("K")

ANSWERED, DEAD, SILENT, FAILED = "answered", "dead", "silent", "failed"


def poll(refs: list[ray.ObjectRef], timeout_s: float) -> list[tuple[str, Any]]:
    """(verdict, value) per ref, in order: value is the result when ANSWERED, else None.
    DEAD: the actor's process is gone; SILENT: no answer within `timeout_s` (all refs share it);
    FAILED: the actor lives but the call raised (e.g. EngineDeadError: vLLM died under the actor)."""
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out: list[tuple[str, Any]] = []
    for ref in refs:
        try:
            out.append((ANSWERED, ray.get(ref, timeout=0)))
        except ray.exceptions.GetTimeoutError:
            out.append((SILENT, None))
        except ray.exceptions.RayActorError:
            out.append((DEAD, None))
        except ray.exceptions.RayTaskError:
            out.append((FAILED, None))
    return out


# ---- start-up: actors that die before they are ready ----
# After a node is lost, Ray lists it alive until the GCS has missed enough of its health checks (about 15-30 s
# by default), and meanwhile may send an actor there: an actor placed without resources goes to a node the
# GCS picks at random among those alive; one placed in a placement group whose bundle the node held waits for
# it. When the GCS declares the node dead it fails such an actor (max_restarts=0: "The actor never ran")
# and stops offering the node, so the same actor started again goes elsewhere. Ray names the node only in
# the message (GcsActorManager::GenNodeDiedCause), hence the pattern.
_NODE_DIED = re.compile(r"its node has died\. Node Id: ([0-9a-f]+)")


def lost_with_node(error: BaseException) -> str | None:
    """When `error` says an actor died because its node died, that node's address (its id when Ray no
    longer lists it); else None: a failure of the actor's own code or process, which a new start repeats."""
    if not isinstance(error, ray.exceptions.RayActorError) or error.actor_init_failed:
        return None
    found = _NODE_DIED.search(str(error))
    if found is None:
        return None
    node_id = found.group(1)
    return next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), node_id[:12])


class NotReady(TimeoutError):
    """Some actors did not answer `ready` before the deadline; `keys` says which."""

    def __init__(self, keys: list, timeout_s: float) -> None:
        super().__init__(f"{keys} not ready within {timeout_s:g} s")
        self.keys = keys


CHECK_S = 2.0  # how often await_ready asks `check` about the actors still waited for


def await_ready(
    pending: dict[ray.ObjectRef, K],
    start_again: Callable[[K, str], ray.ObjectRef],
    timeout_s: float | None = None,
    check: Callable[[K], None] | None = None,
) -> None:
    """Wait for every `ready` call in `pending` (its ref -> the caller's key for that actor). An actor that
    died with its node before it answered is started again (`start_again(key, node address)` returns the new
    actor's `ready` ref), as often as that happens; any other failure is raised at once. Past `timeout_s`
    (None: no deadline) raises NotReady with the keys still waited for. `check(key)`, asked every CHECK_S
    about each actor still waited for, raises when that actor can never start (an actor waiting for a
    placement group bundle that Ray cannot place again fails nothing: without it the wait has no end)."""
    pending = dict(pending)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if check is not None:
            left = CHECK_S if left is None else min(left, CHECK_S)
        done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        if not done:
            if check is None or (deadline is not None and time.monotonic() >= deadline):
                raise NotReady(sorted(pending.values()), timeout_s or 0.0)
            for key in pending.values():
                check(key)
            continue
        key = pending.pop(done[0])
        try:
            ray.get(done[0])
        except ray.exceptions.RayActorError as e:
            node = lost_with_node(e)
            if node is None:
                raise
            pending[start_again(key, node)] = key

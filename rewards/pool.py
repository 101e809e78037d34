"""RewardPool: the driver's handle on M RewardWorker actors (and on the remote reward server).

The driver calls `score(items)` (blocking) or `score_async(items)` + `wait(handle)` to overlap scoring
with generation. Guarantees, whatever the input and whatever dies:
- exactly one VerifyResult per item, in the items' order;
- an item never waits past its time limit inside a worker (the sandbox kills the child);
- a dead (or hung) worker actor is replaced, logged in `pool.replaced`, and the items it had in
  flight are retried once on a live worker; a second loss scores them 0 with `error: worker died`.

Items are spread in small chunks: each worker has one chunk in flight, and the next chunk goes to
whichever worker finishes first (a chunk queued behind a hostile item would wait out its time limit;
the round trip between chunks costs ~1-2 ms against ~100 ms of work per chunk). Small chunks balance a
batch in which a few hostile items take the full time limit, and bound the work redone when a worker
dies. Items with `verifier="remote"` skip the workers and go to the HTTP
reward server through `RemoteVerifier`, concurrently with the local chunks.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from cluster.config import RewardsConfig
from cluster.liveness import DEAD, NotReady, await_ready, poll
from cluster.records import VerifyItem, VerifyResult
from rewards.remote import RemoteVerifier
from rewards.verifiers import safe_echo
from rewards.worker import RewardWorker

_INFLIGHT_PER_WORKER = 1
_MAX_CHUNK = 16
# A worker runs its chunks one after another, in the order they were sent, whichever caller sent
# them. So each chunk's budget, len × (timeout_s + this) + the grace below, counts from the moment the
# chunk reached the head of its worker's queue (sent, and every chunk sent before it answered): a
# chunk queued behind other callers' chunks is not blamed for their time. A worker whose head chunk
# overruns its budget is declared hung, killed and replaced. Generous: it only catches real hangs.
_PER_ITEM_SLACK_S = 1.0
_HUNG_GRACE_S = 60.0


@dataclass
class _Chunk:
    indices: list[int]
    attempt: int = 0


@dataclass
class _Flight:
    chunk: _Chunk
    slot: int
    handle: Any


@dataclass
class _Queued:
    """A chunk sent to a worker and not answered yet (shared by every caller of the pool)."""

    ref: Any
    items: int


@dataclass
class _WorkerQueue:
    """A worker's unanswered chunks in the order it will run them, and since when the head one runs."""

    chunks: deque[_Queued]
    head_since: float


class RewardPool:
    """M RewardWorker actors behind one blocking/async scoring API (see the module docstring).

    `RewardPool(cfg)` starts the actors and waits until every sandbox child is warm (raising
    RuntimeError after `ready_timeout_s`), so the first batch is not slow. `ray.init` must have run.
    `chunk_size` overrides the automatic chunking (1..16 items); `hung_grace_s` is the slack after which
    a worker that has not answered a chunk (len × (timeout_s + 1 s) + grace) is killed as hung; a
    replacement worker that has not answered yet also gets `ready_timeout_s` to start up.

    Actors reserve no CPU by default: the verification work runs in child processes that Ray does not
    account anyway, and on small machines a CPU reservation would compete with the engine and learner
    bundles. Pass `actor_options={"num_cpus": 1}` (or a scheduling strategy) to change that.
    """

    def __init__(
        self,
        cfg: RewardsConfig,
        *,
        actor_options: dict | None = None,
        ready_timeout_s: float = 120.0,
        chunk_size: int | None = None,
        hung_grace_s: float = _HUNG_GRACE_S,
    ) -> None:
        self.cfg = cfg
        self.num_workers = cfg.num_workers
        self.replaced: list[dict] = []
        self._cfg_dict = cfg.model_dump()
        self._actor_options = {"num_cpus": 0, **(actor_options or {})}
        self._chunk_size = chunk_size
        self._hung_grace_s = hung_grace_s
        self._ready_timeout_s = ready_timeout_s
        self._proven: set[Any] = set()  # worker handles (hashed by actor id) that have answered once
        self._queues: dict[Any, _WorkerQueue] = {}  # per worker handle; guarded by self._lock
        self._lock = threading.Lock()
        self._closed = False
        # The remote client first: a token file or variable that cannot be read fails before any actor starts.
        self._remote = RemoteVerifier.from_config(cfg) if cfg.remote_url else None
        self._workers = [self._new_worker(i) for i in range(self.num_workers)]
        try:
            # A worker lost with its node before it was ready (a node lost moments before, which Ray still
            # listed alive) is started again elsewhere: see cluster/liveness.py.
            ready = {w.ready.remote(): slot for slot, w in enumerate(self._workers)}
            await_ready(ready, self._start_again, ready_timeout_s)
        except (NotReady, RayActorError, RayTaskError) as e:
            self.shutdown()
            why = (
                f"workers {e.keys} gave no answer within {ready_timeout_s:g} s"
                if isinstance(e, NotReady)
                else e
            )
            lost = "; ".join(f"worker {r['worker']} {r['reason']}" for r in self.replaced)
            raise RuntimeError(
                f"RewardPool: workers did not start: {why}" + (f" ({lost})" if lost else "")
            ) from e
        self._proven.update(self._workers)
        self._jobs = ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward-pool")
        self._remote_jobs = ThreadPoolExecutor(max_workers=2, thread_name_prefix="reward-remote")

    # ------------------------------------------------------------ public API

    @property
    def workers(self) -> list[Any]:
        """The current actor handles (a copy; replacements change the list)."""
        with self._lock:
            return list(self._workers)

    def worker_pids(self, timeout_s: float = 30.0) -> list[int | None]:
        """Process ids of the worker actors (for diagnostics and fault-injection tests).

        A worker found dead here is replaced and the replacement's pid reported: a death between two
        scoring calls must not fail the caller. A worker too busy to answer in time reports None.
        """
        workers = self.workers
        verdicts = poll([w.ready.remote() for w in workers], timeout_s)
        dead = [slot for slot, (verdict, _) in enumerate(verdicts) if verdict == DEAD]
        for slot in dead:
            self._replace(slot, workers[slot], "found dead")
        if dead:  # ask again: a replacement answers once it has started
            verdicts = poll([w.ready.remote() for w in self.workers], timeout_s)
        return [info and info["pid"] for _, info in verdicts]

    def score(self, items: list[VerifyItem]) -> list[VerifyResult]:
        """Score items, blocking; returns exactly one result per item, in order."""
        if self._closed:
            raise RuntimeError("RewardPool is shut down")
        return self._score(list(items))

    def score_async(self, items: list[VerifyItem]) -> Future:
        """Start scoring and return at once; the handle is a `concurrent.futures.Future`.

        Use it to overlap scoring with generation: `h = pool.score_async(items)`, generate the next
        batch, then `pool.wait(h)`. `h.done()` polls. Several handles may be in flight at once; their
        chunks share the workers.
        """
        if self._closed:
            raise RuntimeError("RewardPool is shut down")
        return self._jobs.submit(self._score, list(items))

    def wait(self, handle: Future, timeout: float | None = None) -> list[VerifyResult]:
        """The results of a `score_async` handle (blocking; `timeout` in seconds, None = no limit)."""
        return handle.result(timeout=timeout)

    def stats(self, timeout_s: float = 10.0) -> list[dict]:
        """Per-worker counters (items, timeouts, crashes, child restarts); dead workers are skipped."""
        out = []
        for w in self.workers:
            with contextlib.suppress(Exception):
                out.append(ray.get(w.stats.remote(), timeout=timeout_s))
        return out

    def shutdown(self) -> None:
        """Stop the actors (their children exit on EOF); idempotent."""
        self._closed = True
        for ex in (getattr(self, "_jobs", None), getattr(self, "_remote_jobs", None)):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "_remote", None) is not None:
            self._remote.close()
        with self._lock:
            workers, self._workers = self._workers, []
        closing = []
        for w in workers:
            with contextlib.suppress(Exception):
                closing.append(w.close.remote())
        with contextlib.suppress(Exception):
            ray.wait(closing, num_returns=len(closing), timeout=5.0)
        for w in workers:
            with contextlib.suppress(Exception):
                ray.kill(w, no_restart=True)

    # ------------------------------------------------------------ internals

    def _new_worker(self, index: int) -> Any:
        return RewardWorker.options(**self._actor_options).remote(self._cfg_dict, index)

    def _start_again(self, slot: int, node: str) -> Any:
        """Worker `slot` was lost with its node before it was ready: a new one, and its `ready` call."""
        print(
            f"duet: reward worker {slot} was lost with its node {node} before it was ready; starting it again",
            file=sys.stderr,
            flush=True,
        )
        self._replace(slot, self._workers[slot], f"lost with its node {node} before it was ready")
        return self._workers[slot].ready.remote()

    def _replace(self, slot: int, dead: Any, reason: str) -> None:
        """Replace the worker in `slot` if it is still `dead` (several jobs may notice the same death)."""
        with self._lock:
            if self._closed or slot >= len(self._workers) or self._workers[slot] is not dead:
                return
            with contextlib.suppress(Exception):
                ray.kill(dead, no_restart=True)
            self._proven.discard(dead)
            self._queues.pop(dead, None)
            self._workers[slot] = self._new_worker(slot)
            self.replaced.append({"time": time.time(), "worker": slot, "reason": reason})

    def _score(self, items: list[VerifyItem]) -> list[VerifyResult]:
        results: list[VerifyResult | None] = [None] * len(items)
        local = [i for i, it in enumerate(items) if it.verifier != "remote"]
        remote = [i for i, it in enumerate(items) if it.verifier == "remote"]
        remote_future: Future | None = None
        if remote:
            if self._remote is None:
                for i in remote:
                    results[i] = VerifyResult(0.0, "error: remote verifier needs rewards.remote_url", 0.0)
            else:
                remote_future = self._remote_jobs.submit(self._remote.score, [items[i] for i in remote])
        if local:
            self._dispatch(items, local, results)
        if remote_future is not None:
            try:
                remote_results = remote_future.result()
            except Exception as e:  # a client bug must not cost the batch its local results
                remote_results = [VerifyResult(0.0, f"error: remote: {_first_line(e)}", 0.0)] * len(remote)
            for i, r in zip(remote, remote_results, strict=True):
                results[i] = r
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _dispatch(self, items: list[VerifyItem], local: list[int], results: list) -> None:
        """Feed chunks to workers (one in flight each), collect, replace dead workers, retry once."""
        m = max(1, self.num_workers)
        size = self._chunk_size or max(1, min(_MAX_CHUNK, math.ceil(len(local) / (m * 4))))
        todo: deque[_Chunk] = deque(_Chunk(local[i : i + size]) for i in range(0, len(local), size))
        flights: dict[Any, _Flight] = {}

        def lost(chunk: _Chunk) -> None:
            if chunk.attempt == 0:
                todo.appendleft(_Chunk(chunk.indices, 1))
            else:
                for i in chunk.indices:
                    results[i] = VerifyResult(0.0, "error: worker died", 0.0)

        while todo or flights:
            workers = self.workers
            if not workers:  # shut down under us: every remaining item still gets its one result
                for f in flights.values():
                    todo.append(f.chunk)
                for chunk in todo:
                    for i in chunk.indices:
                        results[i] = VerifyResult(0.0, "error: reward pool shut down", 0.0)
                return
            for slot, handle in enumerate(workers):
                mine = [f for f in flights.values() if f.slot == slot and f.handle is handle]
                while todo and len(mine) < _INFLIGHT_PER_WORKER:
                    chunk = todo.popleft()
                    ref = self._send(handle, [items[i] for i in chunk.indices])
                    flight = _Flight(chunk, slot, handle)
                    flights[ref] = flight
                    mine.append(flight)
            ready, _ = ray.wait(list(flights), num_returns=1, timeout=0.25)
            for ref in ready:
                f = flights.pop(ref)
                self._answered(f.handle, ref)
                try:
                    out = ray.get(ref)
                    if len(out) != len(f.chunk.indices):
                        raise ValueError(
                            f"worker returned {len(out)} results for {len(f.chunk.indices)} items"
                        )
                except RayActorError as e:
                    self._replace(f.slot, f.handle, f"died: {_first_line(e)}")
                    lost(f.chunk)
                    continue
                except Exception as e:  # the method raised (a bug) or the result was lost
                    self._replace(f.slot, f.handle, f"failed: {_first_line(e)}")
                    lost(f.chunk)
                    continue
                self._proven.add(f.handle)
                for i, r in zip(f.chunk.indices, out, strict=True):
                    results[i] = r
            # Killing a hung worker makes its refs fail with RayActorError: the path above retries them.
            self._kill_hung({f.handle for f in flights.values()})
            # Chunks on a replaced worker whose refs have not failed yet: they fail soon (killed actor).

    def _send(self, handle: Any, items: list[VerifyItem]) -> Any:
        """Send a chunk and queue it on its worker: the ref and the queue entry appear together."""
        with self._lock:
            ref = handle.score.remote(items)
            queue = self._queues.get(handle)
            if queue is None or not queue.chunks:
                queue = self._queues[handle] = _WorkerQueue(deque(), time.monotonic())
            queue.chunks.append(_Queued(ref, len(items)))
            return ref

    def _answered(self, handle: Any, ref: Any) -> None:
        """A chunk answered (or failed): the next one in its worker's queue starts its clock now."""
        with self._lock:
            queue = self._queues.get(handle)
            if queue is None:
                return
            before = len(queue.chunks)
            queue.chunks = deque(q for q in queue.chunks if q.ref != ref)
            if len(queue.chunks) != before:
                queue.head_since = time.monotonic()
            if not queue.chunks and handle not in self._workers:  # a replaced worker's last chunk
                del self._queues[handle]

    def _kill_hung(self, handles: set[Any]) -> None:
        """Replace each of these workers whose head chunk overran its budget (see _PER_ITEM_SLACK_S)."""
        per_item = self.cfg.timeout_s + _PER_ITEM_SLACK_S
        for handle in handles:
            while True:
                with self._lock:
                    queue = self._queues.get(handle)
                    if queue is None or not queue.chunks:
                        break
                    head = queue.chunks[0]
                    budget = head.items * per_item + self._hung_grace_s
                    if handle not in self._proven:  # a replacement may still be starting up
                        budget += self._ready_timeout_s
                    if time.monotonic() - queue.head_since <= budget:
                        break
                    slot = next((i for i, w in enumerate(self._workers) if w is handle), None)
                # Another caller's chunk may have answered without that caller having looked yet.
                done, _ = ray.wait([head.ref], num_returns=1, timeout=0)
                if done:
                    self._answered(handle, head.ref)
                    continue
                if slot is not None:
                    self._replace(slot, handle, "hung: no answer within the chunk's time budget")
                break


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return safe_echo(f"{type(e).__name__}: {text[0] if text else ''}", 200)

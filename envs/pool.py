"""ToolPool: one Ray actor between the engines and N ToolWorker actors; it sizes apart from the engines
(env.num_workers) and its only job is to get every call answered.

    RolloutEngine × E ──start / step / score──► ToolPool ──chunks──► ToolWorker × N (one Environment each)

Guarantees, whatever the environment does and whatever dies (the reward pool's, rewards/pool.py):
- one answer per item, in the items' order;
- a chunk's time is bounded: items × env.timeout_s + 5 s from when a worker takes it (a worker not yet proven
  also gets its start-up time); past it the worker is killed as hung and replaced;
- a dead or hung worker is replaced in its slot (recorded in `events`), and the items of its chunk are run
  again one by one on live workers. A `step` item that fails again alone gets an observation saying so (the
  episode loses a turn); a `start` or `score` item that fails again raises ToolPoolError (an environment
  that cannot start or score an episode is a bug the run should stop on).
The episode's state travels with every call, so any worker serves any call and a replaced worker loses
nothing: its calls, run again, give the same answers (which keeps synchronous runs reproducible).

Ray restarts this actor if it dies (its workers die with it and the new one starts fresh ones) and Ray
retries the engines' calls that were pending on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.liveness import lost_with_node
from cluster.naming import SlotNames, actor_name, run_scope
from cluster.records import Prompt
from envs.base import ToolResult, result
from envs.worker import ToolWorker

_MAX_CHUNK = 16
_GRACE_S = 5.0
_START_S = 120.0  # extra time a worker not yet proven may take (its process and environment start)


class ToolPoolError(RuntimeError):
    """A call that failed on two workers (start, score), or a pool whose workers do not start."""


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ToolPool:
    def __init__(
        self,
        env_cfg: dict,
        num_workers: int,
        worker_env: dict | None = None,
        name_scope: str | None = None,
        worker_options: dict | None = None,
    ) -> None:
        """`name_scope`: the prefix of the workers' Ray names, the run's (cluster/naming.py);
        `worker_options`: Ray options added to every worker's (tests aim workers at a node with them)."""
        self.env_cfg = env_cfg
        # A replacement counts up in its slot. After Ray restarts this pool, the old workers' names may not be
        # free yet (they die with their owner, asynchronously): the new pool's workers carry its pid.
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        kind = f"tool-worker-p{os.getpid()}" if restarted else "tool-worker"
        self._names = SlotNames(name_scope or run_scope(), kind)
        self.timeout_s = float(env_cfg["timeout_s"])
        self.worker_options = {
            "num_cpus": 0,
            "runtime_env": {"env_vars": worker_env or {}},
            **(worker_options or {}),
        }
        self.workers: list[Any] = [self._new(i) for i in range(num_workers)]
        self.proven: set[int] = set()  # slots whose current worker has answered
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(num_workers):
            self.free.put_nowait(slot)
        self.events: list[dict] = []  # worker replacements, for the run's metrics
        self.counts = {"start": 0, "step": 0, "score": 0}

    def _new(self, index: int) -> Any:
        name, start = self._names.next(index)
        return ToolWorker.options(name=name, **self.worker_options).remote(self.env_cfg, index, start)

    def __repr__(self) -> str:  # the Ray dashboard's Repr column (taken once, after __init__)
        return f"ToolPool({len(self.workers)} tool workers, env {self.env_cfg['name']})"

    # ---- what the driver asks ----
    async def ready(self, timeout_s: float = 300.0) -> list[dict]:
        """Every worker's `ready()` once its environment is up. A worker lost with its node before it was
        ready (Ray may place it on a node it still lists alive after the node's loss) is started again, as
        the reward pool does (cluster/liveness.py); any other failure raises ToolPoolError with the worker's
        own error (e.g. the python tool refusing a host it cannot isolate on)."""
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*[self._ready(slot) for slot in range(len(self.workers))]), timeout_s
            )
        except (RayActorError, RayTaskError) as e:
            raise ToolPoolError(
                f"a tool worker (env.name={self.env_cfg['name']}) did not start: {_why(e)}"
            ) from None
        except asyncio.TimeoutError:
            raise ToolPoolError(f"the tool workers did not start within {timeout_s:g} s") from None
        self.proven.update(range(len(self.workers)))
        return infos

    async def _ready(self, slot: int) -> dict:
        while True:
            worker = self.workers[slot]
            try:
                return await worker.ready.remote()
            except RayActorError as e:
                node = lost_with_node(e)
                if node is None:
                    raise
                self._replace(slot, worker, f"lost with its node {node} before it was ready")

    def new_events(self, seen: int) -> list[dict]:
        """Worker replacements after the first `seen`."""
        return self.events[seen:]

    async def worker_pids(self) -> list[int | None]:
        """Each slot's worker process id (tests kill them); None for one that does not answer in 30 s."""
        out = []
        for w in list(self.workers):
            try:
                out.append((await asyncio.wait_for(w.ready.remote(), 30.0))["pid"])
            except Exception:
                out.append(None)
        return out

    def stats(self) -> dict:
        return {"calls": dict(self.counts), "workers": len(self.workers), "replaced": len(self.events)}

    # ---- what the engines ask ----
    async def start(self, prompts: list[Prompt]) -> list[dict]:
        """Each episode's initial state."""
        self.counts["start"] += len(prompts)
        return await self._run("start", prompts)

    async def step(self, items: list[tuple[dict, str]]) -> list[ToolResult]:
        """One ToolResult per (state, turn): the observation, done, error, the state after it, the time."""
        self.counts["step"] += len(items)
        return await self._run("step", items)

    async def score(self, items: list[tuple[dict, str, Prompt]]) -> list[float | None]:
        """Each episode's reward from the environment (None: the run's verifier scores it)."""
        self.counts["score"] += len(items)
        return await self._run("score", items)

    # ---- dispatch ----
    async def _run(self, method: str, items: list) -> list:
        if not items:
            return []
        size = max(1, min(_MAX_CHUNK, math.ceil(len(items) / (2 * len(self.workers)))))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        parts = await asyncio.gather(*(self._chunk(method, c) for c in chunks))
        return [x for part in parts for x in part]

    async def _chunk(self, method: str, items: list) -> list:
        try:
            return await self._on_a_worker(method, items)
        except _Lost:
            # Run again one by one: only the item that hangs or kills its worker is lost, not its chunk.
            return [x for item in items for x in await self._alone(method, item)]

    async def _alone(self, method: str, item: Any) -> list:
        try:
            return await self._on_a_worker(method, [item])
        except _Lost as e:
            if method != "step":
                raise ToolPoolError(f"env {method}() failed on two tool workers: {e}") from None
            state, _turn = item
            return [ToolResult(result(f"error: {e}"), False, True, state, 0.0)]

    async def _on_a_worker(self, method: str, items: list) -> list:
        slot = await self.free.get()
        worker = self.workers[slot]
        budget = len(items) * self.timeout_s + _GRACE_S + (0.0 if slot in self.proven else _START_S)
        try:
            out = await asyncio.wait_for(getattr(worker, method).remote(items), budget)
            self.proven.add(slot)
            return out
        except asyncio.TimeoutError:
            self._replace(slot, worker, f"hung: no answer in {budget:g} s")
            raise _Lost(f"the tool did not answer within {self.timeout_s:g} s") from None
        except RayActorError as e:
            self._replace(slot, worker, f"died: {_why(e)}")
            raise _Lost("the tool worker died") from None
        finally:
            self.free.put_nowait(slot)

    def _replace(self, slot: int, dead: Any, reason: str) -> None:
        if self.workers[slot] is not dead:
            return
        with contextlib.suppress(Exception):
            ray.kill(dead, no_restart=True)
        self.workers[slot] = self._new(slot)
        self.proven.discard(slot)
        self.events.append(
            {"time": time.time(), "event": "tool_worker_replaced", "slot": slot, "reason": reason}
        )

    def shutdown(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.get(w.close.remote(), timeout=5)
            with contextlib.suppress(Exception):
                ray.kill(w, no_restart=True)
        self.workers = []


class _Lost(Exception):
    pass


def _why(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    text = str(cause if isinstance(e, RayTaskError) and cause is not None else e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]


def start_tool_pool(cfg: Any, name_scope: str | None = None) -> Any:
    """The run's ToolPool actor (cfg: the whole Config), or None when env.name is none; `name_scope`: the
    run's prefix for its Ray names (`<scope>/tool-pool-0`, `<scope>/tool-worker-N`). Not waited for:
    call `wait_tool_pool` once the engines are loading. Its workers see the driver's working folder on their
    PYTHONPATH, so a user's environment module next to the config imports there as it does here."""
    if not cfg.env.enabled:
        return None
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    scope = name_scope or run_scope()
    return ToolPool.options(name=actor_name(scope, "tool-pool", 0)).remote(
        cfg.env.model_dump(), cfg.env.num_workers, {"PYTHONPATH": path}, scope
    )


def wait_tool_pool(pool: Any, timeout_s: float = 300.0) -> list[dict]:
    """Until every tool worker is up; ToolPoolError naming the cause otherwise."""
    try:
        return ray.get(pool.ready.remote(timeout_s), timeout=timeout_s + 30)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, ToolPoolError) else ToolPoolError(_why(e))) from None
    except GetTimeoutError:
        raise ToolPoolError(f"the tool pool did not answer within {timeout_s:g} s") from None


def shutdown_tool_pool(pool: Any) -> None:
    with contextlib.suppress(Exception):
        ray.get(pool.shutdown.remote(), timeout=30)
    with contextlib.suppress(Exception):
        ray.kill(pool, no_restart=True)

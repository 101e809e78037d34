"""RolloutFleet: the driver's handle on N RolloutEngine actors, each in its own placement group.

Changing the fleet (a dead engine replaced, engines added or removed) always goes the same way:
form the new set, re-open the weight-transfer group with the learner, push the current weights,
and only then hand the engines prompts. So an engine never generates with stale weights.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.rollout_engine import RolloutEngine
from cluster.config import Config, SamplingConfig
from cluster.liveness import DEAD, FAILED, SILENT, await_ready, poll
from cluster.naming import actor_name, run_scope
from cluster.placement import Plan
from cluster.preflight import BundleWatch, PreflightError, wait_placed
from cluster.records import Completion, Prompt

# What a call on an engine raises when the engine died: its actor (RayActorError), or vLLM's processes
# under a live actor (RayTaskError wrapping EngineDeadError). Which one it was, the healer asks the fleet.
ENGINE_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)
# How often a long wait on the engines says on stderr what it waits for.
WAIT_NOTE_S = 60.0


class RolloutFleet:
    def __init__(self, cfg: Config, plan: Plan, model_path: str, name_scope: str | None = None) -> None:
        """`name_scope`: the prefix of the engines' Ray names, the run's (cluster/naming.py)."""
        self.cfg, self.plan, self.model_path = cfg, plan, model_path
        self.scope = name_scope or run_scope()
        self.engines: list = []
        self.groups: list = []  # one placement group per engine
        self.ids: list[int] = []
        self.next_id = 0
        self.events: list[dict] = []  # replacements and scaling, for metrics.jsonl
        # Per placement group: bounds an engine's start when its bundle's node is lost (cluster/preflight.py).
        self._watches: dict = {}
        self.launch_version = 0  # the policy version the engines of `launch` start at
        # The synchronous loop asks for reproducible batches (exact resume); the async one keeps streaming.
        self.deterministic = cfg.train.max_staleness_versions == 0
        # With an environment (env.name != none): the ToolPool actor, set by whoever starts it. Every
        # generate call then makes episodes: training, refill, evaluation, more rollouts of a prompt.
        self.tools = None
        # `duet eval` of a LoRA adapter: (its folder, its rank); the engines serve the base with it.
        self.adapter: tuple[str, int] | None = None

    @property
    def workers_per_engine(self) -> int:
        """vLLM workers per engine (tensor parallel ranks): each takes its own rank in the transfer group."""
        return self.plan.tensor_parallel_size

    def _start_one(self, version: int):
        i = self.next_id
        self.next_id += 1
        bundle = self.plan.engine_bundles[min(i, len(self.plan.engine_bundles) - 1)]
        env = dict(self.plan.engine_env[i % len(self.plan.engine_env)])
        env.update(VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
        pg = placement_group([bundle])
        wait_placed(pg, self.cfg.cluster.placement_timeout_s, f"RolloutEngine {i}")
        self._watches[pg.id] = BundleWatch(pg, 0, self.cfg.cluster.placement_timeout_s, f"RolloutEngine {i}")
        engine = RolloutEngine.options(
            name=actor_name(self.scope, "engine", i),  # ids are never reused: a replacement has its own
            num_cpus=bundle.get("CPU", 1),
            # The actor holds all its bundle's GPUs: a tensor-parallel engine's mp workers inherit its
            # CUDA_VISIBLE_DEVICES (an actor with none would see, and use, the node's first GPUs).
            num_gpus=self.plan.engine_gpus(),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            runtime_env={"env_vars": env},
            max_concurrency=64,
        ).remote(i, self.model_path, **self.engine_kwargs(i, version))
        return i, engine, pg

    def engine_kwargs(self, i: int, version: int) -> dict:
        """RolloutEngine's settings for engine `i`, starting at policy `version`."""
        r = self.cfg.rollout
        return {
            "dtype": self.cfg.model.dtype,
            "max_model_len": r.max_model_len,
            "tensor_parallel_size": self.plan.tensor_parallel_size,
            "distributed_executor_backend": self.plan.engine_executor,
            "gpu_memory_utilization": r.gpu_memory_utilization,
            "enforce_eager": r.enforce_eager,
            "seed": self.cfg.run.seed + i,
            "weight_transfer_backend": self.plan.weight_transfer,
            "initial_version": version,
            # On GPUs a predecessor's memory may not be free yet (actors/gpu_memory.py); CPUs have no such wait.
            "gpu_memory_wait_s": r.gpu_memory_wait_s
            if self.plan.device == "cuda" and r.gpu_memory_wait_s
            else None,
            # LoRA runs: the base model with vLLM's LoRA, the adapter coming with each weight update.
            **self._lora_kwargs(),
        }

    def _lora_kwargs(self) -> dict:
        lora = self.cfg.learner.lora
        if self.adapter is not None:
            folder, rank = self.adapter
            return {"lora_max_rank": type(lora)(rank=rank).engine_max_rank(), "adapter_path": folder}
        return {"lora_max_rank": lora.engine_max_rank() if lora.enabled else None}

    def start(self, n: int, version: int = 0) -> None:
        self.launch(n, version)
        self.wait_ready()

    def launch(self, n: int, version: int = 0) -> None:
        """Place and create n engines without waiting for vLLM to load: the caller starts the learner
        meanwhile (each takes 10-30 s on a CPU), then calls `wait_ready`. `shutdown` releases them either way."""
        self.launch_version = version
        for _ in range(n):
            i, e, pg = self._start_one(version)
            self.ids.append(i)
            self.engines.append(e)
            self.groups.append(pg)

    def wait_ready(self) -> None:
        """Until every engine has loaded its model; an engine that fails to start raises here. One lost with its
        node before it was ready is placed again, as a new engine in its slot (cluster/liveness.py)."""
        await_ready(
            {e.ready.remote(): k for k, e in enumerate(self.engines)},
            self._place_again,
            check=lambda k: self._watches[self.groups[k].id].check(),
        )

    def _place_again(self, k: int, node: str) -> ray.ObjectRef:
        """The engine in slot k was lost with its node before it was ready: a new engine in a new placement
        group (the node is no longer offered). Returns its `ready` call."""
        old = self.ids[k]
        print(
            f"duet: RolloutEngine {old} was lost with its node {node} before it was ready; placing it again",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(Exception):
            ray.kill(self.engines[k])
        with contextlib.suppress(Exception):
            remove_placement_group(self.groups[k])
        i, engine, pg = self._start_again(old, node, self.launch_version)
        self.ids[k], self.engines[k], self.groups[k] = i, engine, pg
        self.events.append(
            {
                "time": time.time(),
                "event": "engine_replaced",
                "old": old,
                "new": i,
                "reason": f"lost with its node {node} before it was ready",
            }
        )
        return engine.ready.remote()

    def _start_again(self, old: int, node: str, version: int):
        """`_start_one` for an engine whose predecessor was lost with its node; when the cluster can no longer
        hold it, the error names that node."""
        try:
            return self._start_one(version)
        except PreflightError as e:
            raise PreflightError(
                f"RolloutEngine {old} was lost with its node {node} before it was ready, and cannot be placed "
                f"again: {e}"
            ) from None

    def submit(
        self,
        prompts: list[Prompt],
        group_size: int,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
    ) -> list[tuple[int, list[Prompt], ray.ObjectRef]]:
        """Spread prompts over the engines, least-loaded first; a prompt's whole group goes to one engine.
        Returns (slot, its prompts, the generate call's ref) per engine that got prompts."""
        # A dead engine reads as idle: it gets its share, its generate call fails at once, and the
        # caller's recovery (FleetHealer.heal in cluster/healing.py, then a resubmission) runs on the prompts it held.
        loads = [0 if n is None else n for n in self._each("load")]
        chunks: list[list[Prompt]] = [[] for _ in self.engines]
        for p in prompts:
            k = min(range(len(loads)), key=lambda j: loads[j])
            chunks[k].append(p)
            loads[k] += 1
        return [
            (k, chunk, self.submit_to(k, chunk, group_size, sampling, seed))
            for k, chunk in enumerate(chunks)
            if chunk
        ]

    def generate(
        self,
        prompts: list[Prompt],
        group_size: int,
        *,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
        on_failure: Callable[[int, BaseException], bool] | None = None,
        on_stall: Callable[[], object] | None = None,
        label: str = "generation",
    ) -> Iterator[tuple[int, list[Prompt], list[list[Completion]]]]:
        """G completions per prompt, spread over the engines (`submit`): yields (engine id, its prompts,
        their groups) per engine as each chunk arrives.

        The wait has deadlines. A call that failed: `on_failure(engine id, error)` mends the fleet and says
        whether to generate the chunk again (without it, or when it says no, the error is raised). No chunk
        back for `rollout.stall_check_s`: `on_stall()` (which replaces engines that hang), then the chunks
        of engines replaced meanwhile are generated again. Every WAIT_NOTE_S a line on stderr says what the
        wait is for (`label`)."""
        stall_s = self.cfg.rollout.stall_check_s
        pending: dict[ray.ObjectRef, tuple[int, list[Prompt]]] = {}

        def submit(chunk: list[Prompt]) -> None:
            pending.update(
                {r: (self.ids[k], c) for k, c, r in self.submit(chunk, group_size, sampling, seed)}
            )

        submit(prompts)
        t0 = last_chunk = last_note = time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            now = time.monotonic()
            if ready:
                last_chunk = now
                engine_id, chunk = pending.pop(ready[0])
                try:
                    groups = ray.get(ready[0])
                except ENGINE_FAILURES as e:
                    if on_failure is None or not on_failure(engine_id, e):
                        raise
                    submit(chunk)
                    continue
                yield engine_id, chunk, groups
                continue
            if on_stall is not None and now - last_chunk > stall_s:
                on_stall()
                for r in [r for r, (i, _) in pending.items() if i not in self.ids]:
                    submit(pending.pop(r)[1])  # its engine was replaced: the new one generates it
                last_chunk = time.monotonic()
            if now - last_note > WAIT_NOTE_S:
                last_note = now
                print(
                    f"duet: {label} waits {now - t0:.0f} s for engines {sorted({i for i, _ in pending.values()})}, "
                    f"which hold {sum(len(c) for _, c in pending.values())} prompts",
                    file=sys.stderr,
                    flush=True,
                )

    def submit_to(
        self,
        k: int,
        prompts: list[Prompt],
        group_size: int,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
    ) -> ray.ObjectRef:
        """G completions per prompt from the engine in slot k, or G episodes with an environment (the
        `tools` pool set). `sampling`: the training rollouts' unless given (evaluation samples with its own);
        `seed` makes the synchronous loop's batches reproducible (see RolloutEngine.generate)."""
        episodes = self.cfg.env.enabled
        if episodes and self.tools is None:
            raise RuntimeError(f"env.name={self.cfg.env.name}: no tool pool was given to the fleet")
        return self.engines[k].generate.remote(
            prompts,
            group_size,
            sampling or self.cfg.rollout.sampling(),
            self.deterministic and seed is not None,
            None if seed is None else seed * 7919 + self.ids[k],
            self.cfg.env if episodes else None,
            self.tools if episodes else None,
        )

    def resize(self, n: int, version: int) -> dict:
        """Grow or shrink to n engines. Called between steps, so the engines removed have no group in
        flight; the caller reconnects the transfer group so new engines get the weights before prompts."""
        before = len(self.engines)
        if n > before:
            self.start(n - before, version)
        for _ in range(before - n):
            engine, pg, _ = self.engines.pop(), self.groups.pop(), self.ids.pop()
            with contextlib.suppress(Exception):
                ray.get(engine.shutdown.remote(), timeout=30)
            ray.kill(engine)
            remove_placement_group(pg)
        change = {"time": time.time(), "event": "fleet_resized", "from": before, "to": n}
        self.events.append(change)
        return change

    def replace(self, dead: dict[int, tuple[str, bool]], version: int) -> None:
        """Start a new engine in each slot of `dead` (slot -> (reason, answers)); the old ones' placement
        groups are released first. `answers`: the old actor still answers calls (only vLLM under it died).
        The new engines load side by side: several engines lost at once (a node) cost one start, not one
        each."""
        started: dict[int, tuple] = {}  # slot -> (reason, new id, new engine, its placement group)
        for k, (reason, answers) in dead.items():
            if answers:  # its vLLM died under it: the actor shuts down what is left of vLLM's processes
                with contextlib.suppress(Exception):
                    ray.get(self.engines[k].shutdown.remote(), timeout=10)
            with contextlib.suppress(Exception):  # already dead
                ray.kill(self.engines[k])
            remove_placement_group(self.groups[k])
            started[k] = (reason, *self._start_one(version))

        def place_again(k: int, node: str) -> ray.ObjectRef:
            """A new engine lost with its node (e.g. the one that just died) before it was ready."""
            reason, lost, engine, pg = started[k]
            with contextlib.suppress(Exception):
                ray.kill(engine)
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
            started[k] = (reason, *self._start_again(lost, node, version))
            return started[k][2].ready.remote()

        try:
            await_ready(
                {engine.ready.remote(): k for k, (_, _, engine, _) in started.items()},
                place_again,
                check=lambda k: self._watches[started[k][3].id].check(),
            )
        except Exception:
            # None half-kept: the slots still hold the dead ones, for the next heal.
            for _, _, e, pg in started.values():
                with contextlib.suppress(Exception):
                    ray.kill(e)
                with contextlib.suppress(Exception):
                    remove_placement_group(pg)
            raise
        for k, (reason, i, e, pg) in started.items():
            old_id = self.ids[k]
            self.ids[k], self.engines[k], self.groups[k] = i, e, pg
            self.events.append(
                {"time": time.time(), "event": "engine_replaced", "old": old_id, "new": i, "reason": reason}
            )

    def ready_info(self) -> list[dict | None]:
        """Each engine's `ready()` answer; None for one that is dead (the next step replaces it)."""
        return self._each("ready")

    def _each(self, method: str, timeout_s: float = 30.0) -> list:
        """Call `method` on every engine; a dead or silent engine gives None instead of failing the caller.
        For reporting only: decisions that need every engine's answer call the engines directly."""
        return [value for _, value in poll([getattr(e, method).remote() for e in self.engines], timeout_s)]

    def dead_slots(self, timeout_s: float = 30.0, probe_s: float = 0.0) -> dict[int, str]:
        """Slots whose engine cannot generate, with what is wrong: its actor died (`actor died`) or hangs
        (`no answer in N s`), or the actor lives but vLLM's own processes under it died (`vLLM died`:
        `alive()` answers False) or, with `probe_s` > 0, hang (`vLLM hung: ...`; see RolloutEngine.health)."""
        verdicts = poll([e.health.remote(probe_s) for e in self.engines], timeout_s)
        dead = {}
        for k, (verdict, wrong) in enumerate(verdicts):
            if verdict == DEAD:
                dead[k] = "actor died"
            elif verdict == SILENT:
                dead[k] = f"no answer in {timeout_s:.0f} s"
            elif verdict == FAILED:
                dead[k] = "vLLM died"
            elif wrong is not None:
                dead[k] = wrong
        return dead

    def versions(self) -> list[int | None]:
        """Each engine's loaded policy version; None for an engine that is dead."""
        return self._each("weight_version")

    def hold_next_update(self) -> Callable[[], str]:
        """Fault injection (cluster/faults.py, `broadcast.mid`): engine 0's next weight update stops inside
        itself and stays there; returns a wait that ends, saying where, once it is held."""
        engine = self.engines[0]
        ray.get(engine.hold_next_update.remote())  # armed before the update can reach it
        return lambda: ray.get(engine.held_inside_update.remote())

    def received_digests(self) -> list[str | None]:
        out = []
        for per_worker in ray.get([e.received_digest.remote() for e in self.engines]):
            out.extend(per_worker)
        return out

    def checksums(self) -> list:
        return ray.get([e.weight_checksums.remote() for e in self.engines])

    def shutdown(self) -> None:
        for e in self.engines:
            try:
                ray.get(e.shutdown.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(e)
        for pg in self.groups:
            with contextlib.suppress(
                Exception
            ):  # one released already (an engine that could not be placed again)
                remove_placement_group(pg)
        self.engines, self.groups, self.ids = [], [], []

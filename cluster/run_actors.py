"""RunActors: every actor a run holds, started, connected, asked and released in one place.

    learner placement group ─► LearnerGroup (DeepSpeed ranks)      ReplayQueue (one actor)
    RolloutFleet (vLLM engines, one placement group each)           RewardPool (reward workers)
                                                                    ToolPool (tool workers; env.name != none)

`start` places and starts them (failing in seconds, naming what is missing, when the cluster cannot
hold the plan) and opens the weight-transfer group between learner rank 0 and the engines;
`reconnect_fleet` re-opens it after the fleet changed and pushes the current weights; `learner_call`
turns a dead learner rank into RunStopped with the resume hint; `write_actors` keeps RUN_DIR/actors.json
current. The driver's loop uses the parts (fleet, rewards, queue, learner) directly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.replay_queue import ReplayQueue
from cluster import runtime
from cluster.checkpoints import latest_checkpoint
from cluster.config import Config
from cluster.fleet import RolloutFleet
from cluster.naming import actor_name, run_scope
from cluster.placement import make_plan
from cluster.preflight import check_plan, check_run_dir, node_addresses, wait_placed
from cluster.runtime import RunStopped
from envs.pool import shutdown_tool_pool, start_tool_pool, wait_tool_pool
from learner.group import LearnerGroup
from rewards.pool import RewardPool


class RunActors:
    """Built before Ray starts (the plan is checked against the config at once); `start` starts the actors.
    `step_now()` is the step the run is at, for the message when a learner rank dies."""

    def __init__(self, cfg: Config, run_dir: Path, step_now: Callable[[], int]) -> None:
        self.cfg, self.run_dir, self.step_now = cfg, run_dir, step_now
        self.plan = make_plan(cfg)  # a config the planner refuses fails here, before anything starts
        self.fleet: RolloutFleet | None = None
        self.rewards: RewardPool | None = None
        self.queue: Any = None  # the ReplayQueue actor's handle
        self.learner: LearnerGroup | None = None
        self.learner_pg: Any = None
        self.tools: Any = None  # the ToolPool actor's handle (env.name != none)
        self._events_seen = (0, 0, 0)  # fleet events, reward-worker and tool-worker replacements

    def start(self, model_path: str, version: int) -> None:
        """Placement, actors (on the model in `model_path`) and the weight-transfer group; the engines
        start at policy `version`."""
        cfg = self.cfg
        # Fails in seconds, naming what is missing, when the cluster cannot hold the plan.
        plan, warnings = check_plan(cfg)
        self.plan = plan
        for w in warnings:
            print(f"duet: {w}", file=sys.stderr, flush=True)
        self.learner_pg = placement_group(plan.learner_bundles, strategy="PACK")
        wait_placed(self.learner_pg, cfg.cluster.placement_timeout_s, "learner")
        check_run_dir(self.run_dir, self.learner_pg, cfg.cluster.placement_timeout_s)
        scope = run_scope(self.run_dir.name)  # the actors' Ray names (cluster/naming.py)
        self.fleet = RolloutFleet(cfg, plan, model_path, name_scope=scope)
        # The engines load while the learner ranks do (LearnerGroup waits for its ranks to join).
        self.fleet.launch(cfg.rollout.num_engines, version)
        self.tools = start_tool_pool(cfg, scope)  # its workers start while the engines load
        self.rewards = RewardPool(cfg.rewards, name_scope=scope)
        # On the driver's node: the queue's groups are the run's state, which lives and dies with the driver.
        # Placed anywhere (it takes no CPU), it went to an engine's worker node, and that node's loss ended
        # the run (the simulated cluster's node-loss test, once in CI's order of placement).
        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = ReplayQueue.options(
            name=actor_name(scope, "replay-queue", 0), scheduling_strategy=driver_node
        ).remote(cfg.train.queue_capacity_groups, cfg.train.max_staleness_versions, cfg.algorithm.filter_tied)
        if plan.colocated:
            # vLLM sizes its KV cache from the GPU memory it sees while it profiles: the learner, on the
            # same GPU, allocates (and frees) only after that.
            self.fleet.wait_ready()
        self.learner = LearnerGroup(
            cfg,
            model_path,
            self.learner_pg,
            plan.device,
            plan.learner_threads,
            gpus_per_rank=plan.learner_gpus(),
            name_scope=scope,
        )
        self.fleet.wait_ready()
        if self.tools is not None:
            wait_tool_pool(self.tools)
            self.fleet.tools = self.tools
        self.connect_fleet()

    def connect_fleet(self) -> None:
        """Open the weight-transfer group between learner rank 0 and every engine's workers."""
        self.learner_call(
            self.learner.init_broadcast,
            self.fleet.engines,
            self.fleet.workers_per_engine,
            self.plan.weight_transfer,
        )

    def reconnect_fleet(self, version: int) -> dict:
        """A changed fleet gets a new transfer group and the weights of `version` before it takes prompts.
        Returns the broadcast's result."""
        self.learner_call(self.learner.shutdown_broadcast)
        self.connect_fleet()
        sent = self.learner_call(self.learner.broadcast, version)
        self.write_actors()
        return sent

    def learner_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a call on the learner group; a dead rank stops the run with a message naming the checkpoint."""
        try:
            return fn(*args)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            # A task error may be a live rank whose collective lost a dead peer: ask which ranks are gone.
            dead = self.learner.dead_ranks()
            if not dead:
                raise  # every rank is alive; the task failed (e.g. an engine it was sending to died)
            last = latest_checkpoint(self.run_dir)
            where = f"last checkpoint: {last}" if last else "no checkpoint was written yet"
            raise RunStopped(
                f"a learner rank died at step {self.step_now()} (rank {dead[0]}, {type(e).__name__}); the run "
                f"cannot go on without it. {where}. Continue with: duet train --resume {self.run_dir}"
            ) from None

    def new_events(self) -> list[dict]:
        """Engine replacements, fleet resizes and reward-worker replacements since the last call, for the
        step's metrics row."""
        # Counted per list (both only grow): one count over the two joined would skip a later engine
        # event and repeat a reward worker's.
        fleet_seen, rewards_seen, tools_seen = self._events_seen
        tools = ray.get(self.tools.new_events.remote(tools_seen)) if self.tools is not None else []
        new = (
            self.fleet.events[fleet_seen:]
            + [dict(e, component="reward_worker") for e in self.rewards.replaced[rewards_seen:]]
            + [dict(e, component="tool_worker") for e in tools]
        )
        self._events_seen = (len(self.fleet.events), len(self.rewards.replaced), tools_seen + len(tools))
        return new

    def write_actors(self) -> None:
        """RUN_DIR/actors.json: the live processes (for operators, and for the fault tests that kill them)."""
        where = node_addresses()  # node id → address: which host each actor runs on
        engines = [
            {"id": i, "pid": r and r["pid"], "address": r and where.get(r["node"])}
            for i, r in zip(self.fleet.ids, self.fleet.ready_info())
        ]
        ranks = self.learner_call(self.learner.ready_info)
        runtime.write_actors(
            self.run_dir,
            engines,
            [r["pid"] for r in ranks],
            self.rewards.worker_pids(),
            driver_address=ray.util.get_node_ip_address(),
            learner_addresses=[where.get(r["node"]) for r in ranks],
            queue_address=where.get(ray.get(self.queue.node.remote())),
            rendezvous=getattr(self.learner, "rendezvous", None),
            **({"tool_workers": ray.get(self.tools.worker_pids.remote())} if self.tools is not None else {}),
        )

    def shutdown(self) -> None:
        """Release everything this run holds, so several runs can share one Ray (benchmarks, tests)."""
        for part in (self.fleet, self.rewards, self.learner):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.shutdown()
        if self.queue is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.queue)
        if self.tools is not None:
            shutdown_tool_pool(self.tools)
        if self.learner_pg is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.learner_pg)

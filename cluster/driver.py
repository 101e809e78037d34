"""The driver: one prompt's way from the dataset to a weight update, top to bottom.

    dataset ─► RolloutFleet (vLLM engines) ─► RewardPool ─► ReplayQueue ─► LearnerGroup ─► broadcast
                     ▲                                                                      │
                     └──────────────────────── new weights, version v+1 ────────────────────┘

`train` builds a Trainer; `Trainer.run` starts the actors and repeats one step: rollout (generate and
score, or take what the asynchronous producer made) → learn → broadcast → check sync. The driver owns the
loop; it computes no loss and no reward. Around it, each in its own module: Ray, the model and the run
directory (runtime.py), checkpoints (checkpoints.py), the control API (control.py), the asynchronous
producer (pipeline.py), scoring (scoring.py) and evaluation (evaluation.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group

from actors.replay_queue import ReplayQueue
from cluster import dashboard, faults, runtime
from cluster.checkpoints import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from cluster.config import Config
from cluster.control import RunControl, start_control
from cluster.data import PromptStream, load_prompts
from cluster.evaluation import eval_metrics, eval_prompts, evaluate
from cluster.fleet import RolloutFleet
from cluster.metrics import MetricsWriter
from cluster.pipeline import RolloutProducer, failure_name
from cluster.placement import make_plan
from cluster.preflight import check_plan, check_run_dir, node_addresses, wait_placed
from cluster.records import Prompt, ScoredGroup
from cluster.scoring import Scoring, group_metrics, staleness_metrics
from cluster.telemetry import Telemetry
from cluster.trackers import TrackerStartError
from cluster.watchdog import Watchdog
from learner.group import LearnerGroup
from rewards.pool import RewardPool

StepCallback = Callable[["Trainer", dict], None]
# What a call on an engine raises when the engine died: its actor (RayActorError), or vLLM's processes
# under a live actor (RayTaskError wrapping EngineDeadError). Which one it was, heal_fleet asks the fleet.
ENGINE_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)
# Asynchronous mode: with no group queued for this long, the loop asks whether the engines still live,
# and every this often while it waits it says on stderr what it waits for.
STALL_CHECK_S = 20.0
WAIT_NOTE_S = 60.0


def train(
    cfg: Config, run_dir: str | None = None, resume: bool = False, on_step: StepCallback | None = None
) -> Path:
    """Run `cfg.train.steps` steps (from the last checkpoint of `run_dir` with `resume`); returns the
    run directory. `on_step`: see `Trainer.run`."""
    return Trainer(cfg, runtime.new_run_dir(cfg, run_dir, resume), resume=resume).run(on_step)


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. a learner rank died); the message says from where to resume."""


class Trainer:
    """Builds every actor, then runs the loop: synchronous (on-policy) or, with
    train.max_staleness_versions = k > 0, asynchronous with data at most k versions old."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False) -> None:
        runtime.check_run_dir(run_dir, resume)  # one run per folder, refused before anything starts
        self.cfg, self.run_dir = cfg, run_dir
        self.plan = make_plan(cfg)
        self.model_path = runtime.resolve_model(cfg)
        self.prompts = PromptStream(load_prompts(cfg.data, cfg.run.seed), cfg.run.seed, cfg.data.shuffle)
        self.eval_set = eval_prompts(cfg) if cfg.eval.every_steps else None
        self.step = 0
        self.version = 0
        self.control = RunControl(run_dir, cfg.rollout.max_engines)
        self.watchdog = Watchdog(cfg.watchdog)
        self.producer: RolloutProducer | None = None  # asynchronous mode only
        self.applied_midstep: list[dict] = []  # control requests applied while a step waited for data
        self.timeline: list[dict] = []  # who was busy when: engines, rewards, learner, broadcast
        self.resume_from = latest_checkpoint(run_dir) if resume else None
        if resume and self.resume_from is None:
            raise RunStopped(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        runtime.write_config(run_dir, cfg)
        # Secrets are read once, here, before Ray starts: the processes Ray starts do not get them.
        self.control_token = cfg.control.read_token()

    # ---- the run ----
    def run(self, on_step: StepCallback | None = None) -> Path:
        """Start, run the steps, save the final checkpoint, shut down; returns the run directory.

        `on_step(trainer, metrics)` is called once after start-up with step 0 and no metrics (the starting
        policy), then after every step with its metrics before they are written (it may add to them).
        """
        cfg = self.cfg
        # Trackers start before any actor: a run without the tracking asked for does not start. A resumed
        # run supersedes TensorBoard's events of the steps it redoes (purge_step).
        purge_step = checkpoint_step(self.resume_from) + 1 if self.resume_from is not None else None
        try:
            writer = MetricsWriter(self.run_dir, cfg.run.loggers, cfg.run.tracker_project, purge_step)
        except TrackerStartError as e:
            raise RunStopped(str(e)) from e
        server = None
        try:
            self.start()
            telemetry = Telemetry(self.run_dir.name, enabled=cfg.run.ray_metrics)
            control_cfg = cfg.control.model_copy(update={"token": self.control_token})
            server = start_control(self.control, control_cfg, self.run_dir)
            if on_step is not None:
                on_step(self, {})
            fleet_seen = rewards_seen = 0  # events already written, per list (both only grow)
            while self.step < cfg.train.steps:
                applied = self.control.apply(self.resize_fleet, self.save_checkpoint)
                self.step += 1
                metrics = {"step": self.step, **self.train_step()}
                if self.eval_set is not None and self.step % cfg.eval.every_steps == 0:
                    metrics.update(eval_metrics(self.evaluate()))
                metrics["queue"] = ray.get(self.queue.stats.remote())
                metrics["engines"] = len(self.fleet.engines)
                # Counted per list: one count over the two joined would skip a later engine event and
                # repeat a reward worker's.
                metrics["events"] = (
                    self.fleet.events[fleet_seen:]
                    + [dict(e, component="reward_worker") for e in self.rewards.replaced[rewards_seen:]]
                    + applied
                    + self.applied_midstep
                )
                self.applied_midstep = []
                fleet_seen, rewards_seen = len(self.fleet.events), len(self.rewards.replaced)
                if on_step is not None:
                    on_step(self, metrics)
                faults.point("step.before_metrics", self.step)
                writer.write(metrics)
                faults.point("step.after_metrics", self.step)
                engine_versions = dict(zip(self.fleet.ids, self.fleet.versions()))
                telemetry.record_step(metrics, engine_versions, metrics["queue"])
                self.control.publish(self.step, cfg.train.steps, self.version, engine_versions, metrics)
                if cfg.run.progress:
                    print(progress_line(metrics, cfg.train.steps), file=sys.stderr, flush=True)
                stop = self.watchdog.observe(metrics)  # before the checkpoint, which keeps its counts
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                if stop is not None:
                    raise RunStopped(
                        f"watchdog: {stop} (step {self.step}; watchdog.enabled=false turns it off)"
                    )
            if cfg.checkpoint.final:
                self.save_checkpoint(export=True)
        finally:
            if self.producer is not None:
                self.producer.stop()
            if writer is not None:
                writer.close()
            if server is not None:
                server.stop()
            runtime.write_timeline(
                self.run_dir, self.timeline + (self.producer.timeline if self.producer else [])
            )
            self.shutdown()
        return self.run_dir

    # ---- one step ----
    def train_step(self) -> dict:
        """One optimizer step: a batch of `rollout.prompts_per_step` groups, then learn on it."""
        t_step = time.perf_counter()
        batch, scored, metrics = self.rollout_async() if self.producer else self.rollout_sync()
        faults.point("step.after_generate", self.step)
        return self.learn(batch, scored, metrics, t_step)

    def rollout_sync(self) -> tuple[list[ScoredGroup], list[ScoredGroup], dict]:
        """Generate and score the step's prompts, through the queue (which drops tied groups); with
        algorithm.refill (DAPO's dynamic sampling, the paper's 2-GRPO+RS), refill dropped groups with
        fresh prompts. Returns (batch, every group scored, timings)."""
        cfg, want = self.cfg, self.cfg.rollout.prompts_per_step
        metrics = dict.fromkeys(("time/generate_s", "time/reward_s", "time/reward_wait_s"), 0.0)
        scored: list[ScoredGroup] = []
        batch: list[ScoredGroup] = []
        self.heal_fleet("found dead before a step")
        prompts = self.prompts.take(want)
        rounds = 0
        while True:
            groups, timing = self.generate_and_score(prompts, rounds)
            for key in metrics:
                metrics[key] += timing[key]
            scored += groups
            # In slices the queue can hold, each taken before the next is put: `put` waits while the
            # queue is full, and nothing else takes in the synchronous loop.
            cap = cfg.train.queue_capacity_groups
            for i in range(0, len(groups), cap):
                ray.get(self.queue.put.remote(groups[i : i + cap]))
                batch += ray.get(self.queue.take.remote(cap, self.version, None))
            rounds += 1
            if not cfg.algorithm.refill or len(batch) >= want or rounds >= cfg.algorithm.max_refill_rounds:
                break
            prompts = self.prompts.take(want - len(batch))
        metrics["refill/rounds"] = rounds
        return batch, scored, metrics

    def generate_and_score(self, prompts: list[Prompt], round_: int) -> tuple[list[ScoredGroup], dict]:
        """G completions per prompt, scored as each engine's chunk arrives (scoring overlaps generation).
        Round `round_` of the step (refill) has its own sampling seed. A chunk whose engine died is
        generated again after heal_fleet has replaced the engine."""
        g, t0 = self.cfg.rollout.group_size, time.perf_counter()
        seed = self.cfg.run.seed * 1_000_003 + self.step * 101 + round_
        pending: dict = {}  # ref -> (engine id, its prompts)

        def submit(chunk: list[Prompt]) -> None:
            pending.update({r: (self.fleet.ids[k], c) for k, c, r in self.fleet.submit(chunk, g, seed=seed)})

        submit(prompts)
        scoring: list[Scoring] = []
        gen_done = t0
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            engine_id, chunk = pending.pop(ref)
            try:
                groups = ray.get(ref)
            except ENGINE_FAILURES as e:
                # RayActorError: the actor died; RayTaskError(EngineDeadError): vLLM's own processes did.
                self.heal_fleet(f"died mid-step: {failure_name(e)}")  # (may have replaced it already)
                if engine_id in self.fleet.ids:  # it answers a liveness call: not a death to mend
                    raise
                submit(chunk)
                continue
            gen_done = time.perf_counter()
            now = time.time()
            self.timeline.append(
                {"component": f"engine {engine_id}", "start": now - (gen_done - t0), "end": now}
            )
            scoring.append(
                Scoring(self.rewards, chunk, groups, self.cfg.rewards.verifier, self.cfg.algorithm)
            )
        scored = [group for s in scoring for group in s.result()]
        done = time.perf_counter()
        timing = {
            "time/generate_s": gen_done - t0,
            "time/reward_s": done - t0,
            "time/reward_wait_s": done - gen_done,  # what the loop waited on rewards after generation
        }
        return scored, timing

    def rollout_async(self) -> tuple[list[ScoredGroup], list[ScoredGroup], dict]:
        """Take the next `prompts_per_step` groups the producer queued, at most k versions old. Returns
        (batch, every group scored since the last step, timings and staleness).

        The wait has deadlines: an engine whose generate call failed is replaced at once (heal_fleet); with
        no group for STALL_CHECK_S the engines' liveness is checked (a silent death, one engine or many);
        control requests are applied meanwhile; every WAIT_NOTE_S a line on stderr says what it waits for.
        """
        want, t0 = self.cfg.rollout.prompts_per_step, time.perf_counter()
        batch: list[ScoredGroup] = []
        last_group = last_note = time.monotonic()
        while len(batch) < want:
            if self.producer.error is not None:
                raise self.producer.error
            lost = self.producer.lost_engines()
            if lost:
                self.heal_fleet(f"died mid-step: {', '.join(sorted(set(lost.values())))}")
                alive = {i: e for i, e in lost.items() if i in self.fleet.ids}
                if alive:  # it failed a call but still answers: not a death to mend
                    raise RuntimeError(
                        f"engines {sorted(alive)} failed a generate call but are alive: {alive}"
                    ) from self.producer.error_of(next(iter(alive)))
            elif time.monotonic() - last_group > STALL_CHECK_S:
                self.heal_fleet(f"no group for {STALL_CHECK_S:.0f} s", timeout_s=10.0)
                last_group = time.monotonic()
            self.applied_midstep += self.control.apply(self.resize_fleet, self.checkpoint_last_step)
            got = ray.get(self.queue.take.remote(want - len(batch), self.version, 1.0))
            now = time.monotonic()
            if got:
                last_group = now
            batch += got
            if now - last_note > WAIT_NOTE_S and len(batch) < want:
                last_note = now
                print(
                    f"duet: step {self.step} waits {now - t0:.0f} s for data: {len(batch)}/{want} groups; "
                    f"{self.producer.describe()}",
                    file=sys.stderr,
                    flush=True,
                )
        metrics = {"time/wait_data_s": time.perf_counter() - t0, "time/generate_s": 0.0, "time/reward_s": 0.0}
        metrics.update(staleness_metrics(batch, self.version))
        return batch, self.producer.take_scored(), metrics

    def checkpoint_last_step(self) -> Path:
        """A checkpoint asked for while a step waits for its data: of the last step trained (the one being
        assembled has changed nothing yet)."""
        self.step -= 1
        try:
            done = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
            return done if (done / "driver_state.json").exists() else self.save_checkpoint()
        finally:
            self.step += 1

    def learn(
        self, batch: list[ScoredGroup], scored: list[ScoredGroup], metrics: dict, t_step: float
    ) -> dict:
        """Record what was generated, train on the batch, push the new weights, check they arrived."""
        metrics.update(group_metrics(scored, batch, self.version, self.cfg.algorithm.filter_tied))
        if batch:
            t0 = time.perf_counter()
            metrics.update(self.learner_call(self.learner.train_step, batch))
            faults.point("step.after_learn", self.step)
            t1 = time.perf_counter()
            self.version += 1
            checked = self.cfg.train.weights_checked(self.version)
            timer = faults.point_later("broadcast.mid", self.step, faults.BROADCAST_DELAY_S)
            sent = self.broadcast(checked)
            if timer is not None:
                timer.join()  # a transfer shorter than the delay: die right after it, before anything else
            t2 = time.perf_counter()
            metrics.update({"time/train_s": t1 - t0, "time/broadcast_s": t2 - t1})
            now = time.time()
            self.timeline += [
                {"component": "learner", "start": now - (t2 - t0), "end": now - (t2 - t1)},
                {"component": "broadcast", "start": now - (t2 - t1), "end": now},
            ]
            metrics.update(self.check_sync(sent.get("digest"), checked))
        else:  # every group tied: no gradient anywhere, so no step and no new version
            metrics.update(
                {
                    "time/train_s": 0.0,
                    "time/broadcast_s": 0.0,
                    "train/skipped": True,
                    "sync/checksum_match": True,  # nothing was sent: the engines hold the checked weights
                }
            )
        metrics["time/step_s"] = time.perf_counter() - t_step
        metrics["policy_version"] = self.version
        return metrics

    def broadcast(self, checksum: bool = True) -> dict:
        """Push the learner's weights (hashing the bytes only when this step is checked); if an engine died
        during the transfer, heal_fleet replaces it and pushes to every engine again."""
        # The transfer waits on every engine (up to its deadline), so a hung engine (silent, not dead)
        # would stall it: ask first, with a short one. Replacing an engine pushes the current weights.
        sent = self.heal_fleet("found dead before a broadcast", timeout_s=10.0)
        if sent is not None:
            return sent
        try:
            return self.learner_call(self.learner.broadcast, self.version, checksum)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError):
            sent = self.heal_fleet("died during a broadcast")
            if sent is None:
                raise
            return sent

    def check_sync(self, sent_digest: str | None, checked: bool = True) -> dict:
        """After a broadcast (see train.check_weights_every_steps): did every engine get exactly the
        learner's weights? The sha256 of the bytes each engine's workers received equals the sender's,
        vLLM's per-parameter checksums agree between engines, and every engine reports the new version.
        Unchecked steps say so (None), not True."""
        if not checked:
            return {"sync/checksum_match": None}

        def check() -> dict:
            versions = ray.get([e.weight_version.remote() for e in self.fleet.engines])
            digests_ok = sent_digest is None or all(d == sent_digest for d in self.fleet.received_digests())
            sums = self.fleet.checksums() if len(versions) > 1 else []
            ok = all(v == self.version for v in versions) and digests_ok and all(s == sums[0] for s in sums)
            return {"sync/checksum_match": bool(ok), "sync/engine_versions": versions}

        return self.healing(check, "died after a broadcast")

    def evaluate(self, n: int | None = None) -> dict:
        """Score the held-out set on the current weights, n (default eval.samples_per_prompt) samples per
        problem. An engine that dies meanwhile is replaced and the evaluation starts over."""
        e = self.cfg.eval
        held_out = self.eval_set if self.eval_set is not None else eval_prompts(self.cfg)
        return self.healing(
            lambda: evaluate(
                self.fleet,
                self.rewards,
                held_out,
                n or e.samples_per_prompt,
                e.sampling(),
                self.cfg.rewards.verifier,
            ),
            "died during evaluation",
        )

    # ---- engine recovery: the one path ----
    def heal_fleet(self, reason: str, timeout_s: float = 30.0) -> dict | None:
        """Replace the engines that died (found by a cheap call answered within `timeout_s`), reconnect and
        push the current weights. Returns the broadcast's result, or None when every engine was alive."""
        dead = self.fleet.dead_slots(timeout_s)
        if not dead:
            return None
        with self.producer_held():
            for k, what in dead.items():
                self.fleet.replace(k, f"{reason}: {what}", self.version, answers=what == "vLLM died")
            return self.reconnect_fleet()

    def healing(self, fn: Callable[[], Any], reason: str) -> Any:
        """Run `fn()`; if an engine died meanwhile, heal the fleet and run it again."""
        try:
            return fn()
        except ENGINE_FAILURES:
            if self.heal_fleet(reason) is None:
                raise
            return fn()

    def reconnect_fleet(self) -> dict:
        """A changed fleet gets a new transfer group and the current weights before it takes prompts."""
        self.learner_call(self.learner.shutdown_broadcast)
        self.connect_fleet()
        sent = self.learner_call(self.learner.broadcast, self.version)
        self.write_actors()
        return sent

    def resize_fleet(self, engines: int) -> None:
        """The control API's scale request, applied between steps: engines removed finish their groups
        first; new engines get the current weights before they take prompts."""
        if engines != len(self.fleet.engines):
            with self.producer_held(drain=True):
                self.fleet.resize(engines, self.version)
                self.reconnect_fleet()

    @contextlib.contextmanager
    def producer_held(self, drain: bool = False) -> Iterator[None]:
        with self.producer.held(drain) if self.producer else contextlib.nullcontext():
            yield

    # ---- start-up, the learner's calls, checkpoints, status, shut-down ----
    def start(self) -> None:
        """Placement, actors, the weight-transfer group; from a checkpoint with `resume`."""
        cfg = self.cfg
        connects_here = not ray.is_initialized()
        with without_secrets(cfg):  # Ray's workers inherit the driver's environment: not our tokens
            runtime.init_ray(cfg)
        if connects_here:  # a Ray someone else set up in this process (tests, benchmarks): not announced
            dashboard.announce(self.run_dir, cfg.run, local=not os.environ.get("RAY_ADDRESS"))
        # Fails in seconds, naming what is missing, when the cluster cannot hold the plan.
        plan, warnings = check_plan(cfg)
        self.plan = plan
        for w in warnings:
            print(f"duet: {w}", file=sys.stderr, flush=True)
        self.learner_pg = placement_group(plan.learner_bundles, strategy="PACK")
        wait_placed(self.learner_pg, cfg.cluster.placement_timeout_s, "learner")
        check_run_dir(self.run_dir, self.learner_pg, cfg.cluster.placement_timeout_s)
        self.fleet = RolloutFleet(cfg, plan, self.model_path)
        self.rewards = RewardPool(cfg.rewards)
        self.queue = ReplayQueue.remote(
            cfg.train.queue_capacity_groups, cfg.train.max_staleness_versions, cfg.algorithm.filter_tied
        )
        self.learner = LearnerGroup(cfg, self.model_path, self.learner_pg, plan.device, plan.learner_threads)
        self.fleet.start(cfg.rollout.num_engines, self.version)
        if self.control.max_engines is None:
            self.control.max_engines = runtime.engines_the_cluster_holds(plan, cfg.rollout.num_engines)
        self.connect_fleet()
        if self.resume_from is not None:
            state = self.learner_call(load_checkpoint, self.resume_from, self.learner)
            self.step, self.version = state["step"], state["policy_version"]
            print(
                f"duet train: resuming from {self.resume_from} (step {self.step})",
                file=sys.stderr,
                flush=True,
            )
            self.prompts.load_state(state["prompts"])
            self.watchdog.load_state(state.get("watchdog"))
            self.learner_call(self.learner.broadcast, self.version)  # engines start from the checkpoint
            faults.point("resume.after_load", self.step)
            truncate_metrics(self.run_dir, self.step)
        self.write_actors()
        if cfg.train.max_staleness_versions > 0:
            chunk = max(1, cfg.rollout.prompts_per_step // 2)
            self.producer = RolloutProducer(self.fleet, self.rewards, self.queue, self.prompts, cfg, chunk)
            self.producer.start()

    def connect_fleet(self) -> None:
        self.learner_call(
            self.learner.init_broadcast,
            self.fleet.engines,
            self.fleet.workers_per_engine,
            self.plan.weight_transfer,
        )

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
                f"a learner rank died at step {self.step} (rank {dead[0]}, {type(e).__name__}); the run cannot go "
                f"on without it. {where}. Continue with: duet train --resume {self.run_dir}"
            ) from None

    def save_checkpoint(self, export: bool = False) -> Path:
        """A checkpoint of this step (with a Hugging Face export when `export`); see cluster/checkpoints.py."""
        state = {
            "step": self.step,
            "policy_version": self.version,
            "prompts": self.prompts.state(),
            "watchdog": self.watchdog.state(),
            # Sampling RNG is reseeded per step from (run.seed, step), so the step number restores it.
            "rng": {"scheme": "engines reseeded from run.seed and the step", "seed": self.cfg.run.seed},
        }
        export_from = self.model_path if export else None
        return self.learner_call(
            save_checkpoint,
            self.run_dir,
            self.step,
            state,
            self.learner,
            self.cfg.checkpoint.keep,
            export_from,
        )

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
            rendezvous=getattr(self.learner, "rendezvous", None),
        )

    def shutdown(self) -> None:
        """Release everything this run holds, so several runs can share one Ray (benchmarks, tests)."""
        for name in ("fleet", "rewards", "learner"):
            part = getattr(self, name, None)
            if part is not None:
                with contextlib.suppress(Exception):
                    part.shutdown()
        if getattr(self, "queue", None) is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.queue)
        if getattr(self, "learner_pg", None) is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.learner_pg)


@contextlib.contextmanager
def without_secrets(cfg: Config) -> Iterator[None]:
    """The driver's environment without the variables that hold its secrets (the control token's, the
    remote reward server's), while Ray starts: Ray's processes, and every worker they start, inherit
    the environment of the process that started them. The driver keeps them (it reads them)."""
    names = {cfg.control.token_env, getattr(cfg.rewards, "remote_token_env", "DUET_REWARD_TOKEN")}
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def progress_line(m: dict, steps: int) -> str:
    return (
        f"step {m['step']:>3}/{steps}  v{m['policy_version']}  reward {m['reward/mean']:.3f}  "
        f"signal {m['groups/with_signal']}/{m['groups/total']}  loss {m.get('train/loss', 0.0):+.4f}  "
        f"gen {m['time/generate_s']:.1f}s  train {m['time/train_s']:.1f}s  bcast {m['time/broadcast_s']:.2f}s  "
        f"sync {_sync_word(m.get('sync/checksum_match'))}"
    )


def _sync_word(match: bool | None) -> str:
    """None: the step's weights were not compared (train.check_weights_every_steps, or no update)."""
    return "unchecked" if match is None else "ok" if match else "MISMATCH"

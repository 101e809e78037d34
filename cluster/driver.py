"""The driver: one prompt's way from the dataset to a weight update, top to bottom.

    dataset ─► RolloutFleet (vLLM engines) ─► RewardPool ─► ReplayQueue ─► LearnerGroup ─► broadcast
                     ▲                                                                      │
                     └──────────────────────── new weights, version v+1 ────────────────────┘

`train` builds a Trainer; `Trainer.run` starts the actors and repeats one step: rollout (generate and
score, or take what the asynchronous producer made) → learn → broadcast → check sync. The driver owns the
loop; it computes no loss and no reward. Around it, each in its own module: Ray, the model and the run
directory (runtime.py), the actors and their start-up (run_actors.py), engine recovery (healing.py),
checkpoints (checkpoints.py), where a step's metrics go (reporting.py), the control API (control.py), the
asynchronous producer (pipeline.py), scoring (scoring.py) and evaluation (evaluation.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import ray

from cluster import faults, runtime
from cluster.checkpoints import (
    RunCheckpoints,
    check_resumable,
    checkpoint_step,
    latest_checkpoint,
    truncate_metrics,
)
from cluster.config import Config
from cluster.control import RunControl, start_control
from cluster.data import PromptStream, load_prompts
from cluster.evaluation import eval_metrics, eval_prompts, evaluate
from cluster.extension import extend_tied, for_learner
from cluster.fleet import ENGINE_FAILURES, WAIT_NOTE_S
from cluster.healing import FleetHealer
from cluster.pipeline import RolloutProducer
from cluster.records import Prompt, ScoredGroup
from cluster.reporting import StepReporter
from cluster.run_actors import RunActors
from cluster.runtime import RunStopped
from cluster.scoring import Scoring, episode_metrics, group_metrics, staleness_metrics
from cluster.watchdog import Watchdog

StepCallback = Callable[["Trainer", dict], None]


def train(
    cfg: Config, run_dir: str | None = None, resume: bool = False, on_step: StepCallback | None = None
) -> Path:
    """Run `cfg.train.steps` steps (from the last checkpoint of `run_dir` with `resume`); returns the
    run directory. `on_step`: see `Trainer.run`."""
    return Trainer(cfg, runtime.new_run_dir(cfg, run_dir, resume), resume=resume).run(on_step)


class Trainer:
    """Builds every actor, then runs the loop: synchronous (on-policy) or, with
    train.max_staleness_versions = k > 0, asynchronous with data at most k versions old."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False) -> None:
        runtime.check_run_dir(run_dir, resume)  # one run per folder, refused before anything starts
        self.cfg, self.run_dir = cfg, run_dir
        self.actors = RunActors(cfg, run_dir, step_now=lambda: self.step)
        self.model_path = runtime.resolve_model(cfg)
        runtime.resolve_lora_targets(cfg, self.model_path)  # refused here, naming the field, or written down
        self.checkpoints = RunCheckpoints(run_dir, cfg, self.model_path, self.actors)
        self.prompts = PromptStream(load_prompts(cfg.data, cfg.run.seed), cfg.run.seed, cfg.data.shuffle)
        self.eval_set = eval_prompts(cfg) if cfg.eval.every_steps else None
        self.step = 0
        self.version = 0
        self.control = RunControl(run_dir, cfg.rollout.max_engines, paused=cfg.control.start_paused)
        self.watchdog = Watchdog(cfg.watchdog)
        self.producer: RolloutProducer | None = None  # asynchronous mode only
        # Control requests applied while a step waited for data (their events carry "during_step").
        self.applied_midstep: list[dict] = []
        self.last_sync_check: bool | None = None  # the last checked broadcast's sync/checksum_match
        self.timeline: list[dict] = []  # who was busy when: engines, rewards, learner, broadcast
        self.resume_from = latest_checkpoint(run_dir) if resume else None
        if resume and self.resume_from is None:
            raise RunStopped(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        if self.resume_from is not None:
            check_resumable(self.resume_from, cfg)  # a stage change is refused before anything starts
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
        # Trackers start before any actor; a resumed run supersedes their events of the steps it redoes.
        purge_step = checkpoint_step(self.resume_from) + 1 if self.resume_from is not None else None
        reporter = StepReporter(cfg, self.run_dir, self.control, purge_step)
        server = None
        try:
            self.start()
            reporter.start(self.fleet)
            control_cfg = cfg.control.model_copy(update={"token": self.control_token})
            server = start_control(self.control, control_cfg, self.run_dir)
            if on_step is not None:
                on_step(self, {})
            while self.step < cfg.train.steps:
                applied = self.control.apply(self.resize_fleet, self.save_checkpoint)
                self.step += 1
                metrics = {"step": self.step, **self.train_step()}
                if self.eval_set is not None and self.step % cfg.eval.every_steps == 0:
                    metrics.update(eval_metrics(self.evaluate()))
                metrics["queue"] = ray.get(self.queue.stats.remote())
                metrics["engines"] = len(self.fleet.engines)
                metrics["events"] = self.actors.new_events() + applied + self.applied_midstep
                self.applied_midstep = []
                if on_step is not None:
                    on_step(self, metrics)
                reporter.report(metrics, self.version)
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
            reporter.close()
            if server is not None:
                server.stop()
            runtime.write_timeline(
                self.run_dir, self.timeline + (self.producer.timeline if self.producer else [])
            )
            self.actors.shutdown()
        return self.run_dir

    # ---- one step ----
    def train_step(self) -> dict:
        """One optimizer step: a batch of `rollout.prompts_per_step` groups, then learn on it."""
        t_step = time.perf_counter()
        batch, scored, metrics = self.rollout_async() if self.producer else self.rollout_sync()
        faults.point("step.after_generate", self.step)
        return self.learn(batch, scored, metrics, t_step)

    def rollout_sync(self) -> tuple[list[ScoredGroup], list[ScoredGroup], dict]:
        """Generate and score the step's prompts (tied groups extended, with algorithm.extend_tied_to), and
        put them through the queue, which drops tied groups; with algorithm.refill (DAPO's dynamic
        sampling, the paper's 2-GRPO+RS), refill dropped groups with fresh prompts. Returns (batch, every
        group as generated, timings)."""
        cfg, want = self.cfg, self.cfg.rollout.prompts_per_step
        metrics = dict.fromkeys(("time/generate_s", "time/reward_s", "time/reward_wait_s"), 0.0)
        scored: list[ScoredGroup] = []
        batch: list[ScoredGroup] = []
        self.healer.heal("found dead before a step", self.version)
        prompts = self.prompts.take(want)
        rounds = 0
        while True:
            groups = self.rollouts(prompts, rounds, metrics)
            scored += groups
            # In slices the queue can hold, each taken before the next is put: `put` waits while the
            # queue is full, and nothing else takes in the synchronous loop.
            cap = cfg.train.queue_capacity_groups
            for i in range(0, len(groups), cap):
                ray.get(self.queue.put.remote([for_learner(g) for g in groups[i : i + cap]]))
                batch += ray.get(self.queue.take.remote(cap, self.version, None))
            rounds += 1
            if not cfg.algorithm.refill or len(batch) >= want or rounds >= cfg.algorithm.max_refill_rounds:
                break
            prompts = self.prompts.take(want - len(batch))
        metrics["refill/rounds"] = rounds
        return batch, scored, metrics

    def rollouts(self, prompts: list[Prompt], round_: int, timing: dict) -> list[ScoredGroup]:
        """G completions per prompt, scored; with algorithm.extend_tied_to, tied groups get more
        (cluster/extension.py), on the same weights. Each generation has its own sampling seed, fixed by
        (step, refill round `round_`, extension round), so a resumed run makes the same decisions. Adds
        the generations' times to `timing`."""

        def more(chunk: list[Prompt], n: int, extension_round: int) -> list[ScoredGroup]:
            # Extension rounds step the seed by a prime beyond any step's refill rounds.
            seed = self.cfg.run.seed * 1_000_003 + self.step * 101 + round_ + 50_021 * extension_round
            groups, spent = self.generate_and_score(chunk, n, seed)
            for key in spent:
                timing[key] += spent[key]
            return groups

        groups = more(prompts, self.cfg.rollout.group_size, 0)
        cap = self.cfg.algorithm.extend_tied_to
        return extend_tied(groups, cap, more) if cap else groups

    def generate_and_score(self, prompts: list[Prompt], n: int, seed: int) -> tuple[list[ScoredGroup], dict]:
        """n completions per prompt, scored as each engine's chunk arrives (scoring overlaps generation),
        sampled from `seed`: the one place the synchronous loop makes completions (extension rounds ask it
        too). A chunk whose engine died or hangs (no chunk back for `rollout.stall_check_s`) is generated
        again after the healer has replaced the engine; see RolloutFleet.generate."""
        t0 = time.perf_counter()
        chunks = self.fleet.generate(
            prompts,
            n,
            seed=seed,
            on_failure=lambda engine_id, e: self.healer.replaced(engine_id, e, self.version),
            on_stall=self.heal_stalled,
            label=f"step {self.step}",
        )
        scoring: list[Scoring] = []
        gen_done = t0
        for engine_id, chunk, groups in chunks:
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

    def heal_stalled(self) -> None:
        """No chunk back for `rollout.stall_check_s` (a step's or an evaluation's): replace the engines that
        hang (FleetHealer.heal_hung); their chunks are generated again (RolloutFleet.generate)."""
        self.healer.heal_hung(f"no chunk back for {self.cfg.rollout.stall_check_s:g} s", self.version)

    def rollout_async(self) -> tuple[list[ScoredGroup], list[ScoredGroup], dict]:
        """Take the next `prompts_per_step` groups the producer queued, at most k versions old. Returns
        (batch, every group scored since the last step, timings and staleness).

        The wait has deadlines: an engine whose generate call failed is replaced at once (the healer); with
        no group for `rollout.stall_check_s` the engines' liveness is checked (a silent death, one engine or many);
        control requests are applied meanwhile; every WAIT_NOTE_S a line on stderr says what it waits for.
        """
        want, t0 = self.cfg.rollout.prompts_per_step, time.perf_counter()
        stall_s = self.cfg.rollout.stall_check_s
        batch: list[ScoredGroup] = []
        last_group = last_note = time.monotonic()
        while len(batch) < want:
            if self.producer.error is not None:
                raise self.producer.error
            lost = self.healer.heal_lost_engines(self.version)
            if not lost and time.monotonic() - last_group > stall_s:
                self.healer.heal_hung(f"no group for {stall_s:g} s", self.version)
                last_group = time.monotonic()
            applied = self.control.apply(self.resize_fleet, self.checkpoint_last_step)
            self.applied_midstep += [dict(event, during_step=self.step) for event in applied]
            got = ray.get(self.queue.take.remote(want - len(batch), self.version, 1.0))
            now = time.monotonic()
            if got:
                last_group = now
            batch += got
            if len(batch) < want:  # /status says so; a request sent from now on is applied in this wait
                self.control.waiting(self.step, f"data: {len(batch)}/{want} groups")
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

    def learn(
        self, batch: list[ScoredGroup], scored: list[ScoredGroup], metrics: dict, t_step: float
    ) -> dict:
        """Record what was generated, train on the batch, push the new weights, check they arrived."""
        metrics.update(group_metrics(scored, batch, self.version, self.cfg.algorithm.filter_tied))
        metrics.update(episode_metrics(scored, metrics["time/generate_s"] if self.producer is None else None))
        if batch:
            t0 = time.perf_counter()
            metrics.update(self.actors.learner_call(self.learner.train_step, batch))
            faults.point("step.after_learn", self.step)
            t1 = time.perf_counter()
            self.version += 1
            checked = self.cfg.train.weights_checked(self.version)
            faults.point_within("broadcast.mid", self.step, self.fleet.hold_next_update)
            sent = self.broadcast(checked)
            t2 = time.perf_counter()
            metrics.update({"time/train_s": t1 - t0, "time/broadcast_s": t2 - t1})
            # What moved and how: bytes per update, and how many engines each transport reached.
            moved = ("bytes", "shared_memory_engines", "network_engines")
            metrics.update({f"sync/{k}": sent[k] for k in moved if k in sent})
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
                    # Nothing was sent: the engines hold what the last broadcast left, whose check says
                    # what this step can (None: no broadcast checked yet).
                    "sync/checksum_match": self.last_sync_check,
                }
            )
        metrics["time/step_s"] = time.perf_counter() - t_step
        metrics["policy_version"] = self.version
        return metrics

    def broadcast(self, checksum: bool = True) -> dict:
        """Push the learner's weights (hashing the bytes only when this step is checked); if an engine died
        during the transfer, the healer replaces it and pushes to every engine again."""
        # The transfer waits on every engine (up to its deadline), so a hung engine (silent, not dead)
        # would stall it: ask first, actors and vLLM's cores, with short deadlines. Replacing an engine
        # pushes the current weights.
        sent = self.healer.heal_hung("found dead before a broadcast", self.version)
        if sent is not None:
            return sent
        try:
            return self.actors.learner_call(self.learner.broadcast, self.version, checksum)
        except ENGINE_FAILURES:  # or a learner-side failure: heal finds no dead engine and it is re-raised
            sent = self.healer.heal("died during a broadcast", self.version, after_failure=True)
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
            # On every transport, NCCL included: each worker's digest of what it loaded equals rank 0's.
            digests_ok = sent_digest is not None and all(
                d == sent_digest for d in self.fleet.received_digests()
            )
            sums = self.fleet.checksums() if len(versions) > 1 else []
            ok = all(v == self.version for v in versions) and digests_ok and all(s == sums[0] for s in sums)
            return {"sync/checksum_match": bool(ok), "sync/engine_versions": versions}

        result = self.healer.retry(check, "died after a broadcast", self.version)
        self.last_sync_check = result["sync/checksum_match"]
        return result

    # ---- between steps: evaluation, the control API's requests, checkpoints ----
    def evaluate(self, n: int | None = None) -> dict:
        """Score the held-out set on the current weights, n (default eval.samples_per_prompt) samples per
        problem. An engine that dies meanwhile is replaced and the evaluation starts over; one that hangs
        is replaced and its prompts sampled again."""
        e, verifier = self.cfg.eval, self.cfg.rewards.verifier
        held_out = self.eval_set if self.eval_set is not None else eval_prompts(self.cfg)
        return self.healer.retry(
            lambda: evaluate(
                self.fleet,
                self.rewards,
                held_out,
                n or e.samples_per_prompt,
                e.sampling(),
                verifier,
                on_stall=self.heal_stalled,
            ),
            "died during evaluation",
            self.version,
        )

    def resize_fleet(self, engines: int) -> None:
        """The control API's scale request (see FleetHealer.resize)."""
        self.healer.resize(engines, self.version)

    def save_checkpoint(self, export: bool = False) -> Path:
        """A checkpoint of this step (with a Hugging Face export when `export`); see cluster/checkpoints.py."""
        return self.checkpoints.save(self.step, self.version, self.prompts, self.watchdog, export)

    def checkpoint_last_step(self) -> Path:
        """A checkpoint asked for while a step waits for its data: of the last step trained (the one being
        assembled has changed nothing yet)."""
        self.step -= 1
        try:
            return self.checkpoints.of_step(self.step) or self.save_checkpoint()
        finally:
            self.step += 1

    # ---- start-up ----
    def start(self) -> None:
        """Ray, placement, actors, the weight-transfer group; from a checkpoint with `resume`; then, in
        asynchronous mode, the producer."""
        cfg = self.cfg
        runtime.start_ray(cfg, self.run_dir)
        self.actors.start(self.model_path, self.version)
        a = self.actors  # the parts the loop talks to directly
        self.fleet, self.rewards, self.queue, self.learner = a.fleet, a.rewards, a.queue, a.learner
        if self.control.max_engines is None:
            self.control.max_engines = runtime.engines_the_cluster_holds(a.plan, cfg.rollout.num_engines)
        if self.resume_from is not None:
            self.resume()
        a.write_actors()
        if cfg.train.max_staleness_versions > 0:
            chunk = max(1, cfg.rollout.prompts_per_step // 2)
            self.producer = RolloutProducer(self.fleet, self.rewards, self.queue, self.prompts, cfg, chunk)
        self.healer = FleetHealer(self.actors, self.producer)  # holds the producer while it heals
        if self.producer is not None:
            self.producer.start()

    def resume(self) -> None:
        """Continue from `resume_from` (see RunCheckpoints.load); the engines get the checkpoint's weights,
        and the metrics of the steps after it (to be redone) are cut from metrics.jsonl."""
        self.step, self.version = self.checkpoints.load(self.resume_from, self.prompts, self.watchdog)
        print(f"duet train: resuming from {self.resume_from} (step {self.step})", file=sys.stderr, flush=True)
        self.actors.learner_call(self.learner.broadcast, self.version)  # engines start from the checkpoint
        faults.point("resume.after_load", self.step)
        truncate_metrics(self.run_dir, self.step)

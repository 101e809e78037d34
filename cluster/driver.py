"""The driver: one prompt's way from the dataset to a weight update, top to bottom.

    dataset ─► RolloutFleet (vLLM engines) ─► RewardPool ─► ReplayQueue ─► LearnerGroup ─► broadcast
                     ▲                                                                      │
                     └──────────────────────── new weights, version v+1 ────────────────────┘

The driver owns placement, the loop, checkpoints and metrics; it computes no loss and no reward.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group

from actors.replay_queue import ReplayQueue
from cluster import dashboard
from cluster.config import Config
from cluster.control import start_control
from cluster.data import PromptStream, load_prompts
from cluster.evaluation import eval_metrics, eval_prompts, eval_sampling, evaluate
from cluster.fleet import RolloutFleet
from cluster.metrics import MetricsWriter
from cluster.placement import make_plan, ray_cpus_needed
from cluster.records import Prompt, ScoredGroup, VerifyItem
from cluster.telemetry import Telemetry
from cluster.trackers import TrackerStartError
from learner.group import LearnerGroup
from rewards.pool import RewardPool


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. a learner rank died); the message says from where to resume."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a half-written one is still under its `.tmp-` name)."""
    root = run_dir / "checkpoints"
    done = (
        sorted(p for p in root.glob("step_*") if (p / "driver_state.json").exists()) if root.exists() else []
    )
    return done[-1] if done else None


def resolve_model(cfg: Config) -> str:
    """The model folder: the user's, or the embedded tiny model (built and warm-started once)."""
    if cfg.model.path is not None:
        return cfg.model.path
    from learner.tiny_model import ensure_tiny_model

    return str(
        ensure_tiny_model(
            cfg.model.cache_dir, cfg.model.warm_start_steps, cfg.data.synthetic_max_operand, seed=0
        )
    )


def new_run_dir(cfg: Config, run_dir: str | None) -> Path:
    path = Path(run_dir or cfg.run.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`, or pointed at a cluster
        ray.init(log_to_driver=False)
        return
    ray.init(
        # "local": a new Ray even when a `ray start` cluster runs on this machine (address=None would
        # join that one, and then refuse num_cpus)
        address="local",
        num_cpus=max(os.cpu_count() or 1, ray_cpus_needed(cfg)),
        log_to_driver=False,
        **dashboard.ray_init_options(cfg.run),
    )


class Trainer:
    """Builds every actor, then runs `steps` optimizer steps of the synchronous loop."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.plan = make_plan(cfg)
        self.model_path = resolve_model(cfg)
        self.prompts = PromptStream(load_prompts(cfg.data, cfg.run.seed), cfg.run.seed, cfg.data.shuffle)
        self.version = 0
        self.step = 0
        self.requests: queue.Queue = queue.Queue()  # control-API requests, applied between steps
        self.asynchronous = cfg.train.max_staleness_versions > 0
        self.producer = None
        self.prompt_lock = threading.Lock()  # the producer thread takes prompts too (async mode)
        self.scored_lock = threading.Lock()
        self.scored_since_step: list[ScoredGroup] = []
        self.timeline: list[dict] = []  # who was busy when: engines, rewards, learner, broadcast
        self.paused = False
        self._status: dict = {"state": "starting"}
        self._status_lock = threading.Lock()
        self.eval_set = eval_prompts(cfg) if cfg.eval.every_steps else None
        self.resume_from = latest_checkpoint(run_dir) if resume else None
        if resume and self.resume_from is None:
            raise RunStopped(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        (run_dir / "config.yaml").write_text(_yaml(cfg))

    # ---- start-up: placement, actors, the weight-transfer group ----
    def start(self) -> None:
        cfg, plan = self.cfg, self.plan
        connects_here = not ray.is_initialized()
        init_ray(cfg)
        if connects_here:  # a Ray someone else set up in this process (tests, benchmarks): not announced
            dashboard.announce(self.run_dir, cfg.run, local=not os.environ.get("RAY_ADDRESS"))
        self.learner_pg = placement_group(plan.learner_bundles, strategy="PACK")
        ray.get(self.learner_pg.ready())
        self.fleet = RolloutFleet(cfg, plan, self.model_path)
        self.rewards = RewardPool(cfg.rewards)
        self.queue = ReplayQueue.remote(
            cfg.train.queue_capacity_groups, cfg.train.max_staleness_versions, cfg.algorithm.filter_tied
        )
        self.learner = LearnerGroup(cfg, self.model_path, self.learner_pg, plan.device, plan.learner_threads)
        self.fleet.start(cfg.rollout.num_engines, self.version)
        self._connect_fleet()
        if self.resume_from is not None:
            state = self.learner.load_checkpoint(str(self.resume_from / "deepspeed"), "state")
            self.step, self.version = state["step"], state["policy_version"]
            self.prompts.load_state(state["prompts"])
            self.learner.broadcast(self.version)  # the engines start from the checkpoint's weights
            truncate_metrics(self.run_dir, self.step)
        self.write_actors()

    def _connect_fleet(self) -> None:
        self.learner_call(
            self.learner.init_broadcast,
            self.fleet.engines,
            self.fleet.workers_per_engine,
            self.plan.weight_transfer,
        )

    def write_actors(self) -> None:
        """RUN_DIR/actors.json: the live processes (for operators, and for the fault tests that kill them)."""
        info = {
            "driver": os.getpid(),
            "engines": [
                {"id": i, "pid": r and r["pid"]} for i, r in zip(self.fleet.ids, self.fleet.ready_info())
            ],
            "learner": self.learner_call(self.learner.pids),
            "reward_workers": self.rewards.worker_pids(),
        }
        tmp = self.run_dir / ".actors.json"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.run_dir / "actors.json")

    def heal_fleet(self, reason: str) -> dict | None:
        """Replace engines that died (found by a cheap call with a deadline); reconnect and push weights.
        Returns the broadcast's result, or None when every engine was alive."""
        dead = self.fleet.dead_slots()
        for k in dead:
            self.fleet.replace(k, reason, self.version)
        return self.reconnect_fleet() if dead else None

    def reconnect_fleet(self) -> dict:
        """A changed fleet gets a new transfer group and the current weights before it takes prompts."""
        self.learner_call(self.learner.shutdown_broadcast)
        self._connect_fleet()
        sent = self.learner_call(self.learner.broadcast, self.version)
        self.write_actors()
        return sent

    def healing(self, fn: Callable[[], Any], reason: str) -> Any:
        """Run `fn()`; if an engine died meanwhile, replace it (it gets the current weights), run it again."""
        try:
            return fn()
        except ray.exceptions.RayActorError:
            if self.heal_fleet(reason) is None:
                raise
            return fn()

    # ---- one step of the synchronous loop ----
    def rollout(self, prompts: list[Prompt]) -> tuple[list[ScoredGroup], dict]:
        """Generate G completions per prompt and score them, overlapping scoring with generation."""
        g = self.cfg.rollout.group_size
        t0 = time.perf_counter()
        seed = self.cfg.run.seed * 1_000_003 + self.step * 101 + self._round
        pending = {ref: (k, chunk) for k, chunk, ref in self.fleet.submit(prompts, g, seed=seed)}
        scoring = []  # (prompts, groups of completions, reward handle)
        gen_done = t0
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            k, chunk = pending.pop(ref)
            try:
                groups = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                # The engine died mid-step: replace it, give it the current weights, redo its prompts.
                self.fleet.replace(k, f"died mid-step: {type(e).__name__}", self.version)
                self.reconnect_fleet()
                for kk, cc, rr in self.fleet.submit(chunk, g, seed=seed):
                    pending[rr] = (kk, cc)
                continue
            gen_done = time.perf_counter()
            self.timeline.append(
                {
                    "component": f"engine {self.fleet.ids[k]}",
                    "start": time.time() - (gen_done - t0),
                    "end": time.time(),
                }
            )
            items = [
                VerifyItem(
                    completion=c.text, reference=p.answer, verifier=self.cfg.rewards.verifier, prompt=p.text
                )
                for p, group in zip(chunk, groups)
                for c in group
            ]
            scoring.append((chunk, groups, self.rewards.score_async(items)))
        scored = []
        for chunk, groups, handle in scoring:
            results = iter(self.rewards.wait(handle))
            for p, group in zip(chunk, groups):
                res = [next(results) for _ in group]
                scored.append(ScoredGroup(p, group, [r.reward for r in res], [r.reason for r in res]))
        done = time.perf_counter()
        n_comp = sum(len(s.completions) for s in scored)
        timing = {
            "time/generate_s": gen_done - t0,
            "time/reward_s": done - t0,
            "time/reward_wait_s": done - gen_done,  # what the loop waited on rewards after generation
            "rollouts": n_comp,
            "tokens/generated": sum(len(c.token_ids) for s in scored for c in s.completions),
        }
        return scored, timing

    def train_one_step(self) -> dict:
        """Synchronous (on-policy): generate → score → queue → learn → broadcast, one after the other."""
        cfg = self.cfg
        want = cfg.rollout.prompts_per_step
        t_step = time.perf_counter()
        metrics: dict = {"time/generate_s": 0.0, "time/reward_s": 0.0, "time/reward_wait_s": 0.0}
        all_scored: list[ScoredGroup] = []
        batch: list[ScoredGroup] = []
        rounds = 0
        self.heal_fleet("found dead before a step")
        prompts = self.prompts.take(want)
        while True:
            self._round = rounds
            scored, timing = self.rollout(prompts)
            for key in metrics:
                metrics[key] += timing[key]
            all_scored += scored
            ray.get(self.queue.put.remote(scored))
            batch += ray.get(self.queue.take.remote(want - len(batch), self.version, None))
            rounds += 1
            # DAPO's dynamic sampling / the paper's 2-GRPO+RS: refill dropped groups with fresh prompts.
            if not cfg.algorithm.refill or len(batch) >= want or rounds >= cfg.algorithm.max_refill_rounds:
                break
            prompts = self.prompts.take(want - len(batch))
        metrics["refill/rounds"] = rounds
        return self.learn(batch, all_scored, metrics, t_step)

    def train_one_step_async(self) -> dict:
        """Asynchronous (bounded staleness): the producer keeps the engines generating; the learner takes
        the next `prompts_per_step` groups that are at most k versions old, trains, and pushes weights."""
        cfg = self.cfg
        want = cfg.rollout.prompts_per_step
        t_step = time.perf_counter()
        batch: list[ScoredGroup] = []
        while len(batch) < want:
            if self.producer.error is not None:
                raise self.producer.error
            batch += ray.get(self.queue.take.remote(want - len(batch), self.version, 1.0))
        waited = time.perf_counter() - t_step
        with self.scored_lock:
            all_scored, self.scored_since_step = self.scored_since_step, []
        metrics = {"time/wait_data_s": waited, "time/generate_s": 0.0, "time/reward_s": 0.0}
        metrics["staleness/histogram"] = _histogram([self.version - g.version for g in batch])
        metrics["staleness/max_in_flight_versions"] = max(
            (c.version_end - c.version_start for g in batch for c in g.completions), default=0
        )
        return self.learn(batch, all_scored, metrics, t_step)

    def learn(
        self, batch: list[ScoredGroup], all_scored: list[ScoredGroup], metrics: dict, t_step: float
    ) -> dict:
        """Record what was generated, train on the batch, push the new weights, check they arrived."""
        cfg = self.cfg
        completions = [c for s in all_scored for c in s.completions]
        rewards = [r for s in all_scored for r in s.rewards]
        tied = sum(s.tied for s in all_scored)
        reasons: dict[str, int] = {}
        for s in all_scored:
            for why in s.reasons:
                reasons[why.split(":")[0]] = reasons.get(why.split(":")[0], 0) + 1
        tokens = sum(len(c.token_ids) for c in completions)
        metrics.update(
            {
                "rollouts": len(completions),
                "tokens/generated": tokens,
                "reward/mean": sum(rewards) / max(len(rewards), 1),
                "reward/tied_fraction": tied / max(len(all_scored), 1),
                "groups/total": len(all_scored),
                "groups/with_signal": len(all_scored) - tied,
                "groups/dropped_tied": tied if cfg.algorithm.filter_tied else 0,
                "groups/trained": len(batch),
                "completions/truncated_fraction": sum(c.finish_reason == "length" for c in completions)
                / max(len(completions), 1),
                "completions/mean_length": tokens / max(len(completions), 1),
                **{f"reward/reason/{k}": v for k, v in sorted(reasons.items())},
                "staleness/mean": sum(self.version - s.version for s in batch) / max(len(batch), 1),
                "data/prompts": [s.prompt.index for s in all_scored],
                "data/trained_prompts": [s.prompt.index for s in batch],
            }
        )
        if batch:
            t0 = time.perf_counter()
            metrics.update(self.learner_call(self.learner.train_step, batch))
            t1 = time.perf_counter()
            self.version += 1
            sent = self.broadcast()
            t2 = time.perf_counter()
            metrics.update({"time/train_s": t1 - t0, "time/broadcast_s": t2 - t1})
            now = time.time()
            self.timeline += [
                {"component": "learner", "start": now - (t2 - t0), "end": now - (t2 - t1)},
                {"component": "broadcast", "start": now - (t2 - t1), "end": now},
            ]
            metrics.update(self.check_sync(sent.get("digest")))
        else:  # every group tied: no gradient anywhere, so no step and no new version
            metrics.update(
                {
                    "time/train_s": 0.0,
                    "time/broadcast_s": 0.0,
                    "train/skipped": True,
                    "sync/checksum_match": True,
                }
            )
        metrics["time/step_s"] = time.perf_counter() - t_step
        metrics["policy_version"] = self.version
        return metrics

    def learner_call(self, fn, *args):
        """Run a learner-group call; a dead rank stops the run with a message that names the checkpoint."""
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

    def broadcast(self) -> dict:
        """Push the learner's weights; if an engine died during the transfer, replace it and push again."""
        try:
            return self.learner_call(self.learner.broadcast, self.version)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError):
            sent = self.heal_fleet("died during a broadcast")  # the replacement's broadcast sends to all
            if sent is None:
                raise
            return sent

    def evaluate(self) -> dict:
        """Score the held-out set on the current weights. An engine that dies meanwhile is replaced (it
        gets the current weights) and the evaluation starts over, so every problem keeps its n samples."""
        cfg = self.cfg
        args = (self.eval_set, cfg.eval.samples_per_prompt, eval_sampling(cfg), cfg.rewards.verifier)
        return self.healing(lambda: evaluate(self.fleet, self.rewards, *args), "died during evaluation")

    def check_sync(self, sent_digest: str | None) -> dict:
        """After a broadcast: did every engine get exactly the learner's weights?

        Exact on the transport: the sha256 of the bytes each engine's workers received must equal the
        sender's; and vLLM's own per-parameter checksums must agree between engines; and every engine
        must report the new version.
        """
        every = self.cfg.train.check_weights_every_steps
        if not every or self.version % every:
            return {}
        return self.healing(lambda: self._check_sync(sent_digest), "died after a broadcast")

    def _check_sync(self, sent_digest: str | None) -> dict:
        engines = self.fleet.engines
        versions = ray.get([e.weight_version.remote() for e in engines])
        ok_versions = all(v == self.version for v in versions)
        ok_digest = True
        if sent_digest is not None:
            ok_digest = all(d == sent_digest for d in self.fleet.received_digests())
        sums = self.fleet.checksums() if len(engines) > 1 else []
        ok_engines = all(s == sums[0] for s in sums)
        return {
            "sync/checksum_match": bool(ok_versions and ok_digest and ok_engines),
            "sync/engine_versions": versions,
        }

    # ---- the control API (called from the server's threads; applied by the loop between steps) ----
    def status(self) -> dict:
        with self._status_lock:
            return dict(self._status, paused=self.paused)

    def _request(self, kind: str, **kw) -> dict:
        request_id = f"{kind}-{time.monotonic_ns()}"
        self.requests.put((kind, request_id, kw))
        return {"accepted": True, "request_id": request_id, "applied": "before the next step"}

    def scale(self, engines: int) -> dict:
        if engines < 1:
            raise ValueError("engines must be >= 1")
        return self._request("scale", engines=engines)

    def pause(self) -> dict:
        self.paused = True
        return {"accepted": True, "paused": True}

    def resume(self) -> dict:
        self.paused = False
        return {"accepted": True, "paused": False}

    def checkpoint(self) -> dict:
        return self._request("checkpoint")

    def apply_requests(self) -> list[dict]:
        """Apply queued control requests; while paused, wait here (between steps, nothing in flight)."""
        applied = []
        while True:
            try:
                kind, request_id, kw = self.requests.get(timeout=0.2 if self.paused else 0)
            except queue.Empty:
                if self.paused:
                    continue
                return applied
            if kind == "scale" and kw["engines"] != len(self.fleet.engines):
                if self.producer is not None:  # removed engines finish their groups first
                    self.producer.drain()
                self.fleet.resize(kw["engines"], self.version)  # recorded in the fleet's events
                self.reconnect_fleet()  # new engines get the current weights before they take prompts
                if self.producer is not None:
                    self.producer.release()
            elif kind == "checkpoint":
                applied.append(
                    {"request_id": request_id, "event": "checkpoint", "path": str(self.save_checkpoint())}
                )

    def _publish(self, metrics: dict) -> None:
        with self._status_lock:
            self._status = {
                "state": "running",
                "step": self.step,
                "steps": self.cfg.train.steps,
                "policy_version": self.version,
                "engines": [{"id": i, "version": v} for i, v in zip(self.fleet.ids, self.fleet.versions())],
                "queue_depth": metrics.get("queue", {}).get("depth", 0),
                "last_metrics": {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))},
                "run_dir": str(self.run_dir),
            }

    # ---- the run ----
    def run(self) -> Path:
        cfg = self.cfg
        try:  # trackers start before any actor: a run without the tracking asked for does not start
            writer = MetricsWriter(self.run_dir, cfg.run.loggers, cfg.run.tracker_project)
        except TrackerStartError as e:
            raise RunStopped(str(e)) from e
        self._round = 0
        server = None
        try:
            self.start()
            telemetry = Telemetry(self.run_dir.name, enabled=cfg.run.ray_metrics)
            server = start_control(self, cfg.control, self.run_dir)
            if self.asynchronous:
                from cluster.pipeline import RolloutProducer

                self.producer = RolloutProducer(self, chunk_prompts=max(1, cfg.rollout.prompts_per_step // 2))
                self.producer.start()
            step_fn = self.train_one_step_async if self.asynchronous else self.train_one_step
            events_seen = 0
            while self.step < cfg.train.steps:
                applied = self.apply_requests()
                self.step += 1
                metrics = {"step": self.step, **step_fn()}
                if self.eval_set is not None and self.step % cfg.eval.every_steps == 0:
                    metrics.update(eval_metrics(self.evaluate()))
                metrics["queue"] = ray.get(self.queue.stats.remote())
                metrics["engines"] = len(self.fleet.engines)
                events = self.fleet.events + [
                    dict(e, component="reward_worker") for e in self.rewards.replaced
                ]
                metrics["events"] = events[events_seen:] + applied
                events_seen = len(events)
                writer.write(metrics)
                telemetry.record_step(
                    metrics, dict(zip(self.fleet.ids, self.fleet.versions())), metrics["queue"]
                )
                self._publish(metrics)
                if cfg.run.progress:
                    print(progress_line(metrics, cfg.train.steps), file=sys.stderr, flush=True)
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
            if cfg.checkpoint.final:
                self.save_checkpoint(export=True)
        finally:
            if self.producer is not None:
                self.producer.stop()
            writer.close()
            if server is not None:
                server.stop()
            with (self.run_dir / "timeline.jsonl").open("w") as f:
                f.writelines(json.dumps(e) + "\n" for e in self.timeline)
            self.shutdown()
        return self.run_dir

    def save_checkpoint(self, export: bool = False) -> Path:
        """DeepSpeed's checkpoint + the driver's state (+ a HF export), written under a temporary name
        and renamed when complete, so a crash never leaves a checkpoint that looks whole but is not."""
        root = self.run_dir / "checkpoints"
        root.mkdir(exist_ok=True)
        final = root / f"step_{self.step:06d}"
        tmp = root / f".tmp-step_{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        state = {
            "step": self.step,
            "policy_version": self.version,
            "prompts": self.prompts.state(),
            # Sampling RNG is reseeded per step from (run.seed, step), so the step number restores it.
            "rng": {"scheme": "engines reseeded from run.seed and the step", "seed": self.cfg.run.seed},
        }
        self.learner_call(self.learner.save_checkpoint, str(tmp / "deepspeed"), "state", state)
        if export:
            self.learner_call(self.learner.export_hf, str(tmp / "hf"), self.model_path)
        (tmp / "driver_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kept = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
        for old in kept[: -self.cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def shutdown(self) -> None:
        for name in ("fleet", "rewards", "learner"):
            part = getattr(self, name, None)
            if part is not None:
                with contextlib.suppress(Exception):
                    part.shutdown()
        # Release everything this run holds, so several runs can share one Ray (benchmarks, tests).
        if getattr(self, "queue", None) is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.queue)
        if getattr(self, "learner_pg", None) is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.learner_pg)


def _histogram(values: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics of steps after the checkpoint we resume from: they will be recomputed."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def progress_line(m: dict, steps: int) -> str:
    return (
        f"step {m['step']:>3}/{steps}  v{m['policy_version']}  reward {m['reward/mean']:.3f}  "
        f"signal {m['groups/with_signal']}/{m['groups/total']}  loss {m.get('train/loss', 0.0):+.4f}  "
        f"gen {m['time/generate_s']:.1f}s  train {m['time/train_s']:.1f}s  bcast {m['time/broadcast_s']:.2f}s  "
        f"sync {'ok' if m.get('sync/checksum_match') else 'MISMATCH'}"
    )


def _yaml(cfg: Config) -> str:
    """The resolved config, with secrets left out (the control token lives in control.json, mode 0600)."""
    import yaml

    tree = json.loads(cfg.model_dump_json())
    tree["control"]["token"] = None
    tree["rewards"]["remote_token"] = None
    return yaml.safe_dump(tree, sort_keys=False)


def train(cfg: Config, run_dir: str | None = None, resume: bool = False) -> Path:
    trainer = Trainer(cfg, new_run_dir(cfg, run_dir), resume=resume)
    return trainer.run()

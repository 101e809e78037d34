"""The driver: one prompt's way from the dataset to a weight update, top to bottom.

    dataset ─► RolloutFleet (vLLM engines) ─► RewardPool ─► ReplayQueue ─► LearnerGroup ─► broadcast
                     ▲                                                                      │
                     └──────────────────────── new weights, version v+1 ────────────────────┘

The driver owns placement, the loop, checkpoints and metrics; it computes no loss and no reward.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group

from actors.replay_queue import ReplayQueue
from cluster.config import Config
from cluster.data import PromptStream, load_prompts
from cluster.fleet import RolloutFleet
from cluster.metrics import MetricsWriter
from cluster.placement import make_plan, ray_cpus_needed
from cluster.records import Prompt, ScoredGroup, VerifyItem
from learner.group import LearnerGroup
from rewards.pool import RewardPool


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
        num_cpus=max(os.cpu_count() or 1, ray_cpus_needed(cfg)),
        include_dashboard=False,
        log_to_driver=False,
    )


class Trainer:
    """Builds every actor, then runs `steps` optimizer steps of the synchronous loop."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.plan = make_plan(cfg)
        self.model_path = resolve_model(cfg)
        self.prompts = PromptStream(load_prompts(cfg.data, cfg.run.seed), cfg.run.seed, cfg.data.shuffle)
        self.version = 0
        self.step = 0
        (run_dir / "config.yaml").write_text(_yaml(cfg))

    # ---- start-up: placement, actors, the weight-transfer group ----
    def start(self) -> None:
        cfg, plan = self.cfg, self.plan
        init_ray(cfg)
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

    def _connect_fleet(self) -> None:
        self.learner.init_broadcast(
            self.fleet.engines, self.fleet.workers_per_engine, self.plan.weight_transfer
        )

    # ---- one step of the synchronous loop ----
    def rollout(self, prompts: list[Prompt]) -> tuple[list[ScoredGroup], dict]:
        """Generate G completions per prompt and score them, overlapping scoring with generation."""
        g = self.cfg.rollout.group_size
        t0 = time.perf_counter()
        pending = {ref: (k, chunk) for k, chunk, ref in self.fleet.submit(prompts, g)}
        scoring = []  # (prompts, groups of completions, reward handle)
        gen_done = t0
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            k, chunk = pending.pop(ref)
            try:
                groups = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                # The engine died mid-step: replace it, give it the current weights, redo its prompts.
                self.fleet.replace(k, f"died: {type(e).__name__}", self.version)
                self.learner.shutdown_broadcast()
                self._connect_fleet()
                self.learner.broadcast(self.version)
                for kk, cc, rr in self.fleet.submit(chunk, g):
                    pending[rr] = (kk, cc)
                continue
            gen_done = time.perf_counter()
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
        cfg = self.cfg
        want = cfg.rollout.prompts_per_step
        t_step = time.perf_counter()
        metrics: dict = {
            "rollouts": 0,
            "tokens/generated": 0,
            "time/generate_s": 0.0,
            "time/reward_s": 0.0,
            "time/reward_wait_s": 0.0,
        }
        all_scored: list[ScoredGroup] = []
        batch: list[ScoredGroup] = []
        rounds = 0
        prompts = self.prompts.take(want)
        while True:
            scored, timing = self.rollout(prompts)
            for key, v in timing.items():
                metrics[key] += v
            all_scored += scored
            ray.get(self.queue.put.remote(scored))
            batch += ray.get(self.queue.take.remote(want - len(batch), self.version, None))
            rounds += 1
            # DAPO's dynamic sampling / the paper's 2-GRPO+RS: refill dropped groups with fresh prompts.
            if not cfg.algorithm.refill or len(batch) >= want or rounds >= cfg.algorithm.max_refill_rounds:
                break
            prompts = self.prompts.take(want - len(batch))
        rewards = [r for s in all_scored for r in s.rewards]
        tied = sum(s.tied for s in all_scored)
        reasons: dict[str, int] = {}
        for s in all_scored:
            for why in s.reasons:
                key = why.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
        metrics.update(
            {
                "reward/mean": sum(rewards) / max(len(rewards), 1),
                "reward/tied_fraction": tied / max(len(all_scored), 1),
                "groups/total": len(all_scored),
                "groups/with_signal": len(all_scored) - tied,
                "groups/dropped_tied": tied if cfg.algorithm.filter_tied else 0,
                "groups/trained": len(batch),
                "refill/rounds": rounds,
                "completions/truncated_fraction": sum(
                    c.finish_reason == "length" for s in all_scored for c in s.completions
                )
                / max(metrics["rollouts"], 1),
                "completions/mean_length": metrics["tokens/generated"] / max(metrics["rollouts"], 1),
                **{f"reward/reason/{k}": v for k, v in sorted(reasons.items())},
            }
        )
        if batch:
            t0 = time.perf_counter()
            metrics.update(self.learner.train_step(batch))
            metrics["time/train_s"] = time.perf_counter() - t0
            self.version += 1
            t0 = time.perf_counter()
            sent = self.learner.broadcast(self.version)
            metrics["time/broadcast_s"] = time.perf_counter() - t0
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

    def check_sync(self, sent_digest: str | None) -> dict:
        """After a broadcast: did every engine get exactly the learner's weights?

        Exact on the transport: the sha256 of the bytes each engine's workers received must equal the
        sender's; and vLLM's own per-parameter checksums must agree between engines; and every engine
        must report the new version.
        """
        every = self.cfg.train.check_weights_every_steps
        if not every or self.version % every:
            return {}
        versions = self.fleet.versions()
        ok_versions = all(v == self.version for v in versions)
        ok_digest = True
        if sent_digest is not None:
            ok_digest = all(d == sent_digest for d in self.fleet.received_digests())
        sums = self.fleet.checksums() if len(self.fleet.engines) > 1 else []
        ok_engines = all(s == sums[0] for s in sums)
        return {
            "sync/checksum_match": bool(ok_versions and ok_digest and ok_engines),
            "sync/engine_versions": versions,
        }

    # ---- the run ----
    def run(self) -> Path:
        cfg = self.cfg
        writer = MetricsWriter(self.run_dir)
        try:
            self.start()
            while self.step < cfg.train.steps:
                self.step += 1
                metrics = {"step": self.step, **self.train_one_step()}
                metrics["queue"] = ray.get(self.queue.stats.remote())
                events = self.fleet.events + [
                    dict(e, component="reward_worker") for e in self.rewards.replaced
                ]
                metrics["events"] = events[self._events_seen :] if hasattr(self, "_events_seen") else events
                self._events_seen = len(events)
                writer.write(metrics)
                if cfg.run.progress:
                    print(progress_line(metrics, cfg.train.steps), file=sys.stderr, flush=True)
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
            if cfg.checkpoint.final:
                self.save_checkpoint(export=True)
        finally:
            writer.close()
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
        state = {"step": self.step, "policy_version": self.version, "prompts": self.prompts.state()}
        self.learner.save_checkpoint(str(tmp / "deepspeed"), "state", state)
        if export:
            self.learner.export_hf(str(tmp / "hf"), self.model_path)
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
                try:
                    part.shutdown()
                except Exception:
                    pass


def progress_line(m: dict, steps: int) -> str:
    return (
        f"step {m['step']:>3}/{steps}  v{m['policy_version']}  reward {m['reward/mean']:.3f}  "
        f"signal {m['groups/with_signal']}/{m['groups/total']}  loss {m.get('train/loss', 0.0):+.4f}  "
        f"gen {m['time/generate_s']:.1f}s  train {m['time/train_s']:.1f}s  bcast {m['time/broadcast_s']:.2f}s  "
        f"sync {'ok' if m.get('sync/checksum_match') else 'MISMATCH'}"
    )


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def train(cfg: Config, run_dir: str | None = None) -> Path:
    trainer = Trainer(cfg, new_run_dir(cfg, run_dir))
    return trainer.run()

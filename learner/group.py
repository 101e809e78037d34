"""LearnerGroup: K LearnerWorker ranks on their placement-group bundles, driven as one learner.

It turns scored groups into per-sequence training rows (advantages from `learner.advantages`),
shards them across ranks balanced by tokens, and runs one optimizer step on every rank (or
`learner.updates_per_batch` steps on mini-batches, PPO-style, against π_old taken before the first).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import Config
from cluster.liveness import DEAD, await_ready, poll
from cluster.naming import SlotNames, run_scope
from cluster.preflight import BundleWatch, PreflightError, wait_placed
from cluster.records import ScoredGroup
from learner.advantages import compute_advantages
from learner.losses import overlong_adjust
from learner.worker import LearnerWorker


def build_rows(groups: list[ScoredGroup], cfg: Config) -> tuple[list[dict], dict[str, float]]:
    """One training row per completion, with its group-relative advantage (of the groups' final
    rewards); with `algorithm.overlong=mask`, rows of completions cut at max_tokens are not kept. An
    episode's row carries its loss mask: 1 at the model's tokens, 0 at the observations'."""
    algo = cfg.algorithm
    rewards, group_ids, reasons, comps = [], [], [], []
    for g_id, g in enumerate(groups):
        for c, r in zip(g.completions, g.rewards):
            rewards.append(r)
            group_ids.append(g_id)
            reasons.append(c.finish_reason)
            comps.append(c)
    r = torch.tensor(rewards, dtype=torch.float64)
    # The rewards are final: overlong=penalty was applied when the groups were scored (cluster/scoring.py),
    # before "tied" was decided. Only the mask is left to apply here.
    _, keep = overlong_adjust(r, reasons, "mask" if algo.overlong == "mask" else "none")
    adv = compute_advantages(r, torch.tensor(group_ids), algo.advantage, algo.std, algo.scale, algo.eps)
    rows = [
        {
            "prompt_ids": c.prompt_token_ids,
            "completion_ids": c.token_ids,
            "behaviour_logprobs": c.logprobs,
            "advantage": float(a),
            "keep": bool(k) and c.model_token_count > 0,
            "loss_mask": c.loss_mask if c.loss_mask is not None else [1] * len(c.token_ids),
        }
        for c, a, k in zip(comps, adv.tolist(), keep.tolist())
    ]
    stats = {"train/advantage_abs_mean": float(adv.abs().mean()) if len(adv) else 0.0}
    return rows, stats


def _model_tokens(row: dict) -> int:
    """Tokens of a row the loss covers: the model's (an episode's observations are left out)."""
    return sum(row["loss_mask"]) if "loss_mask" in row else len(row["completion_ids"])


class LearnerGroup:
    def __init__(
        self,
        cfg: Config,
        model_path: str,
        placement_group,
        device: str,
        threads: int | None = None,
        bundle_offset: int = 0,
        gpus_per_rank: float = 0.0,
        name_scope: str | None = None,
    ) -> None:
        """`gpus_per_rank`: what each rank holds of its bundle's GPUs, the plan's `learner_gpus()` (half of
        one when the learner shares its GPU with the engine; none on CPU). `name_scope`: the prefix of
        the ranks' Ray names, the run's (cluster/naming.py)."""
        self.cfg = cfg
        self.placement_group = placement_group
        k = cfg.learner.num_ranks
        # A rank started again (see _start_again) counts up its start: `learner-rank-0.2` (cluster/naming.py).
        names = SlotNames(name_scope or run_scope(), "learner-rank")

        def new_rank(rank: int) -> Any:
            return LearnerWorker.options(
                name=names.next(rank)[0],
                num_cpus=1,
                num_gpus=gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=bundle_offset + rank
                ),
            ).remote(rank, k, cfg, model_path, device, threads)  # derived defaults already resolved

        def watched_rank(rank: int) -> Any:
            # Created with its bundle placed: the watch knows the bundle's node should it be lost.
            self._watches[rank] = BundleWatch(
                placement_group, bundle_offset + rank, cfg.cluster.placement_timeout_s, f"learner rank {rank}"
            )
            return new_rank(rank)

        self._new_rank = watched_rank
        self._watches: dict[int, BundleWatch] = {}
        self.workers = [watched_rank(rank) for rank in range(k)]
        try:
            # A rank lost with its node before it was ready starts again on its bundle, which Ray places again
            # on an alive node (cluster/liveness.py); one that waits for a bundle no node can hold any more
            # fails, naming the node. The process group forms once every rank is ready.
            await_ready(
                {w.ready.remote(): rank for rank, w in enumerate(self.workers)},
                self._start_again,
                check=lambda rank: self._watches[rank].check(),
            )
            # The process group's store listens in learner rank 0's own process, on its node: ask it.
            self.process_group_endpoint: tuple[str, int] = ray.get(self.workers[0].open_endpoint.remote())
            ray.get([w.join.remote(*self.process_group_endpoint) for w in self.workers])
        except BaseException:
            self.shutdown()  # no rank left holding its bundle (or a half-formed process group)
            raise
        self.broadcast_endpoint: tuple[str, int] | None = None
        self.batches = 0  # train_step calls so far: seeds the mini-batch shuffle (kept in checkpoints)

    def _start_again(self, rank: int, node: str) -> ray.ObjectRef:
        """Rank `rank` was lost with its node before it was ready: a new one on its bundle, once Ray has placed
        the bundle again (it reschedules a lost node's bundles), within cluster.placement_timeout_s."""
        print(
            f"duet: learner rank {rank} was lost with its node {node} before it was ready; starting it again",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(Exception):
            ray.kill(self.workers[rank])
        try:
            wait_placed(self.placement_group, self.cfg.cluster.placement_timeout_s, "learner")
        except PreflightError as e:
            raise PreflightError(
                f"learner rank {rank} was lost with its node {node} before it was ready, and its bundle cannot be "
                f"placed again: {e}"
            ) from None
        self.workers[rank] = self._new_rank(rank)
        return self.workers[rank].ready.remote()

    def ready_info(self) -> list[dict]:
        """Each rank's {"rank", "pid", "node"}."""
        return ray.get([w.ready.remote() for w in self.workers])

    def pids(self) -> list[int]:
        return [r["pid"] for r in self.ready_info()]

    def dead_ranks(self, timeout_s: float = 30.0) -> list[int]:
        """Ranks whose process is gone. A rank that is only slow to answer is not counted."""
        verdicts = poll([w.ready.remote() for w in self.workers], timeout_s)
        return [rank for rank, (verdict, _) in enumerate(verdicts) if verdict == DEAD]

    def _shard(self, rows: list[dict]) -> list[list[dict]]:
        """Longest first onto the least-loaded rank: ranks finish their forward/backward together.
        Every rank gets a shard (maybe empty): all of them must take part in each step's collectives."""
        shards: list[list[dict]] = [[] for _ in self.workers]
        loads = [0] * len(self.workers)
        for row in sorted(rows, key=lambda r: -(len(r["prompt_ids"]) + len(r["completion_ids"]))):
            i = loads.index(min(loads))
            shards[i].append(row)
            loads[i] += len(row["prompt_ids"]) + len(row["completion_ids"])
        return shards

    def _micro_batches(self, shards: list[list[dict]]) -> int:
        """The most micro-batches any rank has: every rank runs that many (see LearnerWorker.train_step)."""
        mb = self.cfg.learner.micro_batch_size
        return max(1, max(-(-len(s) // mb) for s in shards))

    def _update(self, rows: list[dict]) -> dict[str, float]:
        """One optimizer step on `rows`, sharded over the ranks; stats reduced over the ranks."""
        agg = self.cfg.algorithm.aggregation
        units = [(_model_tokens(r) if agg == "token_mean" else 1) if r["keep"] else 0 for r in rows]
        denominator = float(max(sum(units), 1))
        shards = self._shard(rows)
        n = self._micro_batches(shards)
        results = ray.get([w.train_step.remote(s, denominator, n) for w, s in zip(self.workers, shards)])
        tokens = sum(r["train/tokens"] for r in results) or 1.0
        keys = list(dict.fromkeys(k for r in results for k in r))  # a rank with no rows lacks some
        stats: dict[str, float] = {}
        for key in keys:
            if key == "train/loss":
                stats[key] = sum(r.get(key, 0.0) for r in results)
            elif key in ("train/grad_norm",):
                stats[key] = results[0][key]
            elif key == "time/train_rank_s":
                stats[key] = max(r[key] for r in results)
            elif key == "train/tokens":
                stats[key] = tokens
            else:
                stats[key] = sum(r.get(key, 0.0) * r["train/tokens"] for r in results) / tokens
        return stats

    def _set_old_logprobs(self, rows: list[dict]) -> None:
        """π_old of every row (no-grad forward on the ranks, before any update), as row["old_logprobs"]."""
        shards = self._shard(rows)
        forwards = self._micro_batches(shards)
        results = ray.get([w.old_logprobs.remote(s, forwards) for w, s in zip(self.workers, shards)])
        for shard, logps in zip(shards, results):
            for row, logp in zip(shard, logps):
                row["old_logprobs"] = logp

    def train_step(self, groups: list[ScoredGroup]) -> dict[str, float]:
        """One batch: `learner.updates_per_batch` optimizer steps (1: one step, π_old = the policy that
        starts it; M > 1: π_old taken once, then M steps on seeded-shuffled mini-batches of the rows)."""
        rows, stats = build_rows(groups, self.cfg)
        self.batches += 1
        m = self.cfg.learner.updates_per_batch
        if m == 1:
            stats.update(self._update(rows))
            return stats
        t0 = time.perf_counter()
        self._set_old_logprobs(rows)
        stats["time/old_logprobs_s"] = time.perf_counter() - t0
        order = list(range(len(rows)))
        random.Random(f"minibatches:{self.cfg.run.seed}:{self.batches}").shuffle(order)
        n = max(1, min(m, len(rows)))  # no empty mini-batch: an Adam step on zero gradients still moves
        minis = [[rows[j] for j in order[i * len(rows) // n : (i + 1) * len(rows) // n]] for i in range(n)]
        updates = [self._update(mini) for mini in minis]
        keys = list(dict.fromkeys(k for u in updates for k in u))
        for key in keys:
            values = [u[key] for u in updates if key in u]
            if key == "train/grad_norm":
                stats[key] = updates[-1][key]
            elif key in ("train/tokens", "time/train_rank_s"):
                stats[key] = sum(values)
            else:  # per-update means (loss included): their mean over the updates
                stats[key] = sum(values) / len(values)
        stats["train/updates"] = float(n)
        return stats

    def init_broadcast(
        self, engines: list, workers_per_engine: int, backend: str, timeout_s: float | None = None
    ) -> None:
        """`timeout_s`: deadline of one weight update (and of the rendezvous) on learner rank 0."""
        # Learner rank 0 listens for the engines: the address and port are taken on its node, by it.
        address, port = ray.get(self.workers[0].free_port.remote())
        self.broadcast_endpoint = (address, port)
        self.rendezvous = {"address": address, "port": port}  # recorded in RUN_DIR/actors.json
        bucket = int(self.cfg.learner.broadcast_bucket_mib * (1 << 20))
        ray.get(
            [
                w.init_broadcast.remote(
                    engines,
                    address,
                    port,
                    workers_per_engine,
                    backend,
                    bucket,
                    timeout_s,
                    self.cfg.cluster.weight_transport,
                )
                for w in self.workers
            ]
        )

    def broadcast(self, version: int, checksum: bool = True) -> dict[str, Any]:
        """Push the weights as `version`. `checksum`: hash the bytes at both ends, for the driver's check
        (`sync/checksum_match`); the steps that are not checked skip the hashing."""
        results = ray.get([w.broadcast.remote(version, checksum) for w in self.workers])
        return results[0]

    def shutdown_broadcast(self) -> None:
        ray.get([w.shutdown_broadcast.remote() for w in self.workers])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get([w.full_state_dict.remote() for w in self.workers])[0]

    def perturb(self, scale: float, seed: int) -> None:
        ray.get([w.perturb.remote(scale, seed) for w in self.workers])

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        state = {**client_state, "learner_batches": self.batches}
        ray.get([w.save_checkpoint.remote(directory, tag, state) for w in self.workers])

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        state = ray.get([w.load_checkpoint.remote(directory, tag) for w in self.workers])[0]
        self.batches = int(state.get("learner_batches", 0))
        return state

    def export_hf(self, directory: str, tokenizer_from: str) -> None:
        ray.get([w.export_hf.remote(directory, tokenizer_from) for w in self.workers])

    def export_adapter(self, directory: str) -> None:
        ray.get([w.export_adapter.remote(directory) for w in self.workers])

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get([w.adapter_state_dict.remote() for w in self.workers])[0]

    def shutdown(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(w)

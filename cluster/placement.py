"""Placement: engine bundles apart from learner bundles, in Ray placement groups.

Each rollout engine is its own placement group (one bundle of `gpus_per_engine` GPUs, or one CPU
slot on CPU) so the fleet can grow and shrink at run time without touching the learner, whose ranks
share one placement group (`PACK`: keep the DeepSpeed ranks close). On CPU, vLLM's OpenMP threads are
bound per engine (`rollout.cpu_threads_bind`) and the learner can be pinned (`learner.cpu_affinity`);
vLLM's engine-core and front-end processes are not bound (benchmarks/pipeline.py measures the effect).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cluster.config import Config


@dataclass
class Plan:
    device: str  # "cuda" | "cpu"
    weight_transfer: str  # "nccl" | "gloo"
    engine_bundles: list[dict[str, float]]
    learner_bundles: list[dict[str, float]]
    engine_env: list[dict[str, str]]  # per engine: vLLM CPU settings
    learner_threads: int | None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"device: {self.device} (weight transfer: {self.weight_transfer})"]
        for i, (b, env) in enumerate(zip(self.engine_bundles, self.engine_env)):
            extra = f"  threads bind {env.get('VLLM_CPU_OMP_THREADS_BIND')}" if env else ""
            lines.append(f"  RolloutEngine {i}: placement group bundle {b}{extra}")
        for i, b in enumerate(self.learner_bundles):
            lines.append(f"  LearnerWorker rank {i}: learner placement group bundle {b}")
        if self.learner_threads:
            lines.append(f"  learner torch threads per rank: {self.learner_threads}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def cpu_binds(num_engines: int, cores: int, setting: str) -> list[str]:
    """Per-engine VLLM_CPU_OMP_THREADS_BIND: disjoint core ranges when there are enough cores."""
    if setting != "auto":
        return [setting] * num_engines
    if num_engines > cores:
        return ["nobind"] * num_engines
    per = cores // num_engines
    return [f"{i * per}-{i * per + per - 1}" if per > 1 else str(i * per) for i in range(num_engines)]


def make_plan(cfg: Config) -> Plan:
    device = resolve_device(cfg.run.device)
    n, k = cfg.rollout.num_engines, cfg.learner.num_ranks
    if device == "cuda":
        return Plan(
            device="cuda",
            weight_transfer="nccl",
            engine_bundles=[{"GPU": cfg.rollout.gpus_per_engine, "CPU": 1} for _ in range(n)],
            learner_bundles=[{"GPU": cfg.learner.gpus_per_rank, "CPU": 1} for _ in range(k)],
            engine_env=[{} for _ in range(n)],
            learner_threads=None,
        )
    cores = cfg.run.cpu_cores or os.cpu_count() or 1
    binds = cpu_binds(n, cores, cfg.rollout.cpu_threads_bind)
    env = [
        {"VLLM_CPU_OMP_THREADS_BIND": b, "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.cpu_kvcache_gib)}
        for b in binds
    ]
    notes = []
    if cfg.train.max_staleness_versions == 0:
        notes.append("synchronous loop: engines and learner take turns on the same cores")
    return Plan(
        device="cpu",
        weight_transfer="gloo",
        engine_bundles=[{"CPU": 1} for _ in range(n)],
        learner_bundles=[{"CPU": 1} for _ in range(k)],
        engine_env=env,
        learner_threads=max(1, cores // k),
        notes=notes,
    )


def ray_cpus_needed(cfg: Config) -> int:
    """Logical CPUs a local Ray needs: one slot per engine, learner rank, reward worker and the queue."""
    return cfg.rollout.num_engines + cfg.learner.num_ranks + cfg.rewards.num_workers + 2

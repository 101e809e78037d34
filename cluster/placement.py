"""Placement: engine bundles apart from learner bundles, in Ray placement groups.

Each rollout engine is its own placement group of one bundle, so the fleet can grow and shrink at
run time without touching the learner, whose ranks share one placement group (`PACK`: keep the
DeepSpeed ranks close).

A tensor-parallel engine (`rollout.gpus_per_engine` = T > 1) runs vLLM's `mp` executor: the engine
actor holds all T GPUs of its bundle (a bundle always lies on one node) and vLLM starts its T workers
as child processes, which inherit the actor's CUDA_VISIBLE_DEVICES. The alternative, vLLM's Ray
executor, is what vLLM picks by default inside a placement group, and it refuses a bundle with more
than one GPU (vllm/v1/executor/ray_utils.py); it would also need an actor holding no GPU, and on
Ray 2.60 such an actor sees every GPU of its node. So the plan names the executor explicitly.
On CPU the same path runs with T worker processes, each bound to its own cores (`a|b` in
VLLM_CPU_OMP_THREADS_BIND), which is how the tests exercise tensor-parallel engines without GPUs.

`run.device=auto` is resolved from the cluster's resources (any GPU on any alive node), not from the
driver's own torch: on a cluster the driver runs on a head that usually has no GPU.

On CPU a single-worker engine runs its vLLM worker inside vLLM's engine-core process (`rollout.cpu_executor`,
`cpu_engine_env`), as vLLM does on a GPU; vLLM's own CPU default starts the worker as a process of its own.

On CPU, vLLM's OpenMP threads are bound per engine (`rollout.cpu_threads_bind`) and the learner can
be pinned (`learner.cpu_affinity`); vLLM's engine-core and front-end processes are not bound
(benchmarks/pipeline.py measures the effect).

Steering: `cluster.engine_resources` / `cluster.learner_resources` add custom Ray resources to the
engine and learner bundles, so engines land only on nodes started with that resource (e.g.
`ray start --resources='{"rollout_node": 8}'`) and the learner on others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cluster.config import Config


@dataclass
class Plan:
    device: str  # "cuda" | "cpu"
    weight_transfer: str  # the engines' vLLM weight-transfer backend: "duet_nccl" | "duet_host"
    engine_bundles: list[dict[str, float]]
    learner_bundles: list[dict[str, float]]
    engine_env: list[dict[str, str]]  # per engine: vLLM CPU settings
    learner_threads: int | None
    tensor_parallel_size: int = 1  # vLLM workers per engine
    colocated: bool = False  # the engine and the learner rank share one GPU (cluster.colocate)
    notes: list[str] = field(default_factory=list)

    @property
    def engine_executor(self) -> str | None:
        """vLLM's distributed executor: `mp` for a tensor-parallel engine (see the module docstring);
        None lets a single-worker engine run in-process, as vLLM picks."""
        return "mp" if self.tensor_parallel_size > 1 else None

    def engine_gpus(self) -> float:
        """GPUs the engine actor itself holds: all of its bundle's, so vLLM's workers see exactly those
        (half of one when colocated with the learner)."""
        return self.engine_bundles[0].get("GPU", 0) if self.engine_bundles else 0

    def learner_gpus(self) -> float:
        """GPUs each learner rank holds: its bundle's."""
        return self.learner_bundles[0].get("GPU", 0) if self.learner_bundles else 0

    def describe(self) -> str:
        lines = [f"device: {self.device} (weight transfer: {self.weight_transfer})"]
        tp = f", tensor parallel {self.tensor_parallel_size} ({self.engine_executor} executor)"
        for i, (b, env) in enumerate(zip(self.engine_bundles, self.engine_env)):
            extra = f"  threads bind {env.get('VLLM_CPU_OMP_THREADS_BIND')}" if env else ""
            lines.append(
                f"  RolloutEngine {i}: placement group bundle {b}"
                + (tp if self.tensor_parallel_size > 1 else "")
                + extra
            )
        for i, b in enumerate(self.learner_bundles):
            lines.append(f"  LearnerWorker rank {i}: learner placement group bundle {b}")
        if self.learner_threads:
            lines.append(f"  learner torch threads per rank: {self.learner_threads}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve_device(requested: str, cluster_gpus: float | None = None) -> str:
    """`auto`: CUDA when the cluster has a GPU anywhere. `cluster_gpus` is the cluster's total
    (preflight reads it from the alive nodes); None means a local Ray not started yet, which will
    hold this machine's GPUs, so the local torch decides."""
    if requested != "auto":
        return requested
    if cluster_gpus is not None:
        return "cuda" if cluster_gpus > 0 else "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def parse_cores(spec: str) -> list[int]:
    """Core ids of a list like "0-1,4" (as VLLM_CPU_OMP_THREADS_BIND and learner.cpu_affinity write them)."""
    cores: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


def cpu_binds(num_engines: int, cores: int, setting: str, workers_per_engine: int = 1) -> list[str]:
    """Per-engine VLLM_CPU_OMP_THREADS_BIND: disjoint core ranges when there are enough cores.
    A tensor-parallel engine gets one range per worker, joined by `|` (vLLM's syntax for ranks)."""
    if setting != "auto":
        return [setting] * num_engines
    ranks = num_engines * workers_per_engine
    if ranks > cores:
        return ["nobind"] * num_engines
    per = cores // ranks

    def span(j: int) -> str:
        return f"{j * per}-{j * per + per - 1}" if per > 1 else str(j * per)

    return [
        "|".join(span(i * workers_per_engine + w) for w in range(workers_per_engine))
        for i in range(num_engines)
    ]


# What each of the engine and the learner rank holds of the GPU they share (cluster.colocate).
COLOCATED_SHARE = 0.5


def cpu_engine_env(
    threads_bind: str, kvcache_gib: int = 1, executor: str = "uni", omp_threads: int | None = None
) -> dict[str, str]:
    """The environment of one engine actor on CPU: its OpenMP cores, its KV cache, and its executor.

    OpenMP threads: as many as the cores the engine is bound to (`omp_threads` overrides; "nobind": left to
    Ray). Ray sets OMP_NUM_THREADS to the actor's CPUs in its bundle (1) when it is unset, and with `uni`
    vLLM starts no worker process of its own, the only place where it sets OMP_NUM_THREADS from the
    binding (vllm/utils/ompmultiprocessing.py): an engine bound to 2 cores generated on one thread
    (benchmarks/real_model.py: 6.3 s against 3.9 s for vLLM on both cores).

    `uni` runs vLLM's worker inside the engine-core process. vLLM's CPU platform turns `uni` into `mp`
    unless VLLM_ENABLE_V1_MULTIPROCESSING is 0 (vllm/platforms/cpu.py); AsyncLLM keeps its engine core in
    a process of its own whatever that variable says, so setting it has this one effect here. Measured
    (benchmarks/engine_executor.py): a launch about 11 s shorter on 2 cores, and generation faster (no
    message queue between the engine core and its worker).
    """
    env = {"VLLM_CPU_OMP_THREADS_BIND": threads_bind, "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib)}
    if omp_threads is None and threads_bind not in ("nobind", "auto"):
        omp_threads = len(parse_cores(threads_bind.split("|")[0]))
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    if executor == "uni":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def make_plan(cfg: Config, cluster_gpus: float | None = None) -> Plan:
    device = resolve_device(cfg.run.device, cluster_gpus)
    n, k, tp = cfg.rollout.num_engines, cfg.learner.num_ranks, cfg.rollout.gpus_per_engine
    extra_engine, extra_learner = cfg.cluster.engine_resources, cfg.cluster.learner_resources
    if device == "cuda" and cfg.cluster.colocate:
        # Half a GPU each: on a one-GPU node Ray gives both actors that GPU (the same
        # CUDA_VISIBLE_DEVICES); vLLM's memory share is rollout.gpu_memory_utilization, the learner has
        # the rest. NCCL refuses two ranks on one device, so the weights take the gloo path.
        return Plan(
            device="cuda",
            weight_transfer="duet_host",
            engine_bundles=[{"GPU": COLOCATED_SHARE, "CPU": 1, **extra_engine}],
            learner_bundles=[{"GPU": COLOCATED_SHARE, "CPU": 1, **extra_learner}],
            engine_env=[{}],
            learner_threads=None,
            colocated=True,
            notes=["colocated: engine and learner rank share one GPU, weights through host memory (gloo)"],
        )
    if device == "cuda":
        return Plan(
            device="cuda",
            weight_transfer="duet_nccl",
            engine_bundles=[{"GPU": tp, "CPU": 1, **extra_engine} for _ in range(n)],
            learner_bundles=[{"GPU": cfg.learner.gpus_per_rank, "CPU": 1, **extra_learner} for _ in range(k)],
            engine_env=[{} for _ in range(n)],
            learner_threads=None,
            tensor_parallel_size=tp,
        )
    cores = cfg.run.cpu_cores or os.cpu_count() or 1
    binds = cpu_binds(n, cores, cfg.rollout.cpu_threads_bind, tp)
    executor = cfg.rollout.cpu_executor if tp == 1 else "mp"
    # Asynchronous with automatic binding: the learner trains on the engines' cores while they generate, so
    # an engine keeps one thread per CPU Ray gave it; otherwise it takes every core it is bound to.
    shared = cfg.train.max_staleness_versions > 0 and cfg.rollout.cpu_threads_bind == "auto"
    env = [
        cpu_engine_env(b, cfg.rollout.cpu_kvcache_gib, executor, omp_threads=tp if shared else None)
        for b in binds
    ]
    notes = []
    if cfg.train.max_staleness_versions == 0:
        notes.append("synchronous loop: engines and learner take turns on the same cores")
    return Plan(
        device="cpu",
        weight_transfer="duet_host",
        engine_bundles=[{"CPU": tp, **extra_engine} for _ in range(n)],
        learner_bundles=[{"CPU": 1, **extra_learner} for _ in range(k)],
        engine_env=env,
        learner_threads=max(1, cores // k),
        tensor_parallel_size=tp,
        notes=notes,
    )


def ray_cpus_needed(cfg: Config) -> int:
    """Logical CPUs a local Ray needs: the engines' and learner ranks' slots, the reward workers, the queue."""
    engine_cpus = cfg.rollout.num_engines * cfg.rollout.gpus_per_engine
    return engine_cpus + cfg.learner.num_ranks + cfg.rewards.num_workers + 2

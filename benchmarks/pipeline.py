"""How close does duet-rl's pipeline come to what the engines can do alone?

    python benchmarks/pipeline.py [--steps 20] [--quick] [--model-cache DIR]

In one process and one Ray instance, on the same engine configuration and the same prompt stream:
(1) engines alone: the fleet's RolloutEngine generating `steps` batches of `prompts_per_step` prompts back to
    back, with no training, kept busy the way the asynchronous producer keeps it (2 chunks of
    prompts_per_step // 2 prompts in flight per engine), deterministic=False: the ceiling, in tokens/s;
(2) duet-rl synchronous (train.max_staleness_versions = 0);
(3) duet-rl asynchronous with k = 1 and k = 2 (cluster/pipeline.py's RolloutProducer).
Each run is `Trainer(cfg, run_dir).run()` for `steps` steps; the first `warmup` steps are left out of every
figure. On CPU the engines and the learner get disjoint cores: the engine's OpenMP threads are bound to
core 0 (rollout.cpu_threads_bind=0), the learner rank is pinned to core 1 (learner.cpu_affinity=1), and
the ceiling is measured with the same binding. Everything else (the driver, the reward workers, Ray's
own processes and vLLM's front-end and scheduler) is not pinned: it shares the two cores.

Workload: the embedded tiny Llama *without* its warm start (model.warm_start_steps=0). The warm-started
model answers `\\boxed{12}</s>` in ~5 tokens, which makes generation a rounding error next to training;
untrained, it samples until max_tokens or a random </s> (~50 tokens of 64), so generating a batch costs
about as much as training on it. Rewards are then all 0, so algorithm.filter_tied=false: every group is
trained on (zero advantages, but the same forward/backward work), and sync and async train on the same
number of groups per step. This is a benchmark of the plumbing, not of learning.

Reported per mode: generated tokens/s (Σ tokens/generated ÷ Σ time/step_s over the measured steps) and its
ratio to (1); the fraction of the wall time the engine was busy (union of the timeline's engine
intervals; also with the broadcasts, when the engine is paused for the copy, taken out); step time against
max(generation, training) (sync: time/generate_s; async: the tokens a step needs ÷ the ceiling's tokens/s;
training: the run's own time/train_s); the broadcast time (time/broadcast_s, median) against the floor
of the transport: one gloo broadcast of a flat uint8 buffer of the model's byte count between two
processes on the learner's and the engine's cores (median); and the staleness histograms.
Diagnostics of what bounds the asynchronous mode: the CPU time each role (engine core, vLLM front-end,
learner, reward workers, driver, Ray, other users) used over each measured window and how busy each core
was; the latency of one RPC into the engine and of a pause/resume; the whole engine pinned to core 0;
and the broadcast of a larger model (~109 MB) against its floor. With `--capped-queue N`, async k = 1
again with train.queue_capacity_groups = N × prompts_per_step (before the producer's admission knew the
staleness bound, that cap was the way to keep it from generating groups too stale to train on).

The honest ceiling: the engine alone again with core 1 kept busy by a pinned matmul loop (it cannot
borrow the learner's core, as it cannot in a run); measured in every mode, `--quick` included.

Writes benchmarks/results/pipeline.json (top level: async_throughput_ratio, step_time_ratio,
broadcast_floor_ratio, stale_drop_fraction, trained_throughput_ratio, broadcast_fixed_ms,
broadcast_per_byte_ratio, goals, machine, date, command) and pipeline.png (the timeline: one row per
component, one panel per mode). Of async k = 1: stale_drop_fraction = groups the queue dropped as too
stale ÷ groups put into it over the whole run; trained_throughput_ratio = tokens of the trained groups per
second ÷ the honest ceiling's tokens/s. broadcast_fixed_ms and broadcast_per_byte_ratio are copied from
benchmarks/results/broadcast.json (benchmarks/broadcast.py measures the cost model; its date is kept
with them). Goals: async_throughput_ratio ≥ 0.9, step_time_ratio ≤ 1.1, broadcast_floor_ratio ≤ 1.5,
stale_drop_fraction ≤ 0.05, trained_throughput_ratio ≥ 0.85. `--quick` (~4 min): 4 steps, k = 1 only,
no diagnostics; it writes pipeline_quick.json / .png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository first, always: `python benchmarks/X.py` puts benchmarks/ first on sys.path, where
# benchmarks/rewards.py would shadow the `rewards` package (even with the repository on PYTHONPATH).
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks.common import add_common_arguments, provenance  # noqa: E402
from cluster.config import Config, load_config  # noqa: E402
from cluster.data import PromptStream, load_prompts  # noqa: E402
from cluster.driver import StepCallback, Trainer  # noqa: E402
from cluster.fleet import RolloutFleet  # noqa: E402
from cluster.metrics import read_metrics  # noqa: E402
from cluster.placement import make_plan  # noqa: E402
from cluster.runtime import init_ray, resolve_model  # noqa: E402

ENGINE_CORES = "0"
LEARNER_CORES = "1"
GOALS = {
    "async_throughput_ratio_min": 0.9,
    "step_time_ratio_max": 1.1,
    "broadcast_floor_ratio_max": 1.5,
    "stale_drop_fraction_max": 0.05,
    "trained_throughput_ratio_min": 0.85,
}


# ---------------------------------------------------------------- configuration
def run_config(args: argparse.Namespace, k: int, run_dir: Path, **extra: object) -> Config:
    overrides = [
        f"model.cache_dir={args.model_cache}",
        f"model.warm_start_steps={args.warm_start_steps}",
        "algorithm.filter_tied=false",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.max_tokens={args.max_tokens}",
        f"rollout.cpu_threads_bind='{ENGINE_CORES}'",
        f"learner.cpu_affinity='{LEARNER_CORES}'",
        "run.cpu_cores=2",
        f"train.max_staleness_versions={k}",
        f"train.steps={args.steps}",
        "control.enabled=false",
        "checkpoint.final=false",
        "run.progress=false",
        "run.ray_metrics=false",
        f"run.run_dir={run_dir}",
    ]
    overrides += [f"{key}={value}" for key, value in extra.items()]
    return load_config(overrides=overrides)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- who used the two cores
ROLES = (
    ("EngineCore", "vLLM EngineCore process (scheduler, unpinned)"),
    ("RolloutEngine", "vLLM front-end (RolloutEngine actor, unpinned)"),
    ("LearnerWorker", "learner (core 1)"),
    ("RewardWorker", "reward workers"),
    ("rewards.sandbox", "reward workers"),
    ("os.nice(15)", "stand-in learner load (matmul loop on core 1)"),
)
ENGINE_WORKER = "vLLM worker (model; OpenMP bound to core 0)"
RAY = "Ray (raylet, GCS, queue, idle workers)"


def _labels() -> dict[int, str]:
    """pid → role, for every process: ours are the driver's descendants; a child takes its parent's role
    (a child of vLLM's EngineCore is its model worker)."""
    import psutil

    info: dict[int, tuple[int, str]] = {}
    for proc in psutil.process_iter(["pid", "ppid", "name", "cmdline"]):
        text = " ".join([proc.info["name"] or "", *(proc.info["cmdline"] or [])[:3]])
        info[proc.info["pid"]] = (proc.info["ppid"] or 0, text)

    def own(pid: int) -> str | None:
        return next((label for needle, label in ROLES if needle in info[pid][1]), None)

    me = os.getpid()

    def role(pid: int) -> str:
        chain = [pid]  # the process, its parent, ... up to the driver or the root
        while chain[-1] != me and chain[-1] in info and len(chain) < 64:
            parent = info[chain[-1]][0]
            if parent in chain or parent not in info:
                break
            chain.append(parent)
        if chain[-1] != me:
            return "other users' processes"
        if pid == me:
            return "driver (+ producer thread)"
        for i, cur in enumerate(chain[:-1]):
            found = own(cur)
            if found is not None:
                return ENGINE_WORKER if i and "EngineCore" in info[cur][1] else found
        return RAY

    return {pid: role(pid) for pid in info}


def cpu_snapshot() -> dict:
    """CPU seconds per process (labelled by role) and per core, now."""
    import psutil

    labels = _labels()
    procs = {}
    for proc in psutil.process_iter(["pid", "cpu_times"]):
        with contextlib.suppress(Exception):
            t = proc.info["cpu_times"]
            procs[proc.info["pid"]] = (
                labels.get(proc.info["pid"], "other users' processes"),
                t.user + t.system,
            )
    cores = [c.user + c.nice + c.system + c.irq + c.softirq + c.steal for c in psutil.cpu_times(percpu=True)]
    return {"time": time.time(), "procs": procs, "cores": cores}


def cpu_usage(a: dict, b: dict) -> dict:
    """Average cores used between two snapshots, by role, and how busy each core was."""
    wall = max(b["time"] - a["time"], 1e-9)
    roles: dict[str, float] = {}
    for pid, (label, cpu) in b["procs"].items():
        before = a["procs"].get(pid, (label, 0.0))[1] if pid in a["procs"] else 0.0
        roles[label] = roles.get(label, 0.0) + max(cpu - before, 0.0) / wall
    return {
        "window_s": wall,
        "cores_used_by_role": {k: round(v, 3) for k, v in sorted(roles.items(), key=lambda kv: -kv[1])},
        "core_busy_fraction": [round((y - x) / wall, 3) for x, y in zip(a["cores"], b["cores"])],
    }


# ---------------------------------------------------------------- (1) engines alone


def pin_tree(pid: int, cores: str) -> None:
    """Pin every thread of a process and of all its descendants to `cores`."""
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), {int(c) for c in cores.split(",")})


@contextlib.contextmanager
def busy_core(core: str):
    """A matmul loop pinned to `core` (one thread, nice 15 like a Ray worker): the learner's core kept as busy
    as the learner keeps it."""
    code = (
        # nice 15: Ray runs its worker processes (the learner among them) at nice 15
        f"import os; os.nice(15); os.sched_setaffinity(0, {{{int(core)}}}); import torch; "
        "torch.set_num_threads(1); "
        "a = torch.randn(384, 384)\nwhile True: a = (a @ a).tanh()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(3.0)  # torch import
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def generate_back_to_back(fleet: RolloutFleet, stream: PromptStream, cfg: Config, chunks: int) -> dict:
    """`chunks` chunks of prompts_per_step // 2 prompts, 2 in flight per engine, as the producer submits."""
    g = cfg.rollout.group_size
    chunk = max(1, cfg.rollout.prompts_per_step // 2)
    pending: dict = {}
    submitted = 0
    intervals: list[dict] = []
    tokens = completions = 0
    t0 = time.time()

    def submit(k: int) -> None:
        nonlocal submitted
        ref = fleet.submit_to(k, stream.take(chunk), g)  # no seed: not deterministic, as the producer
        pending[ref] = (k, time.time())
        submitted += 1

    snap = cpu_snapshot()
    for k in range(len(fleet.engines)):
        for _ in range(2):
            if submitted < chunks:
                submit(k)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        k, start = pending.pop(ref)
        groups = ray.get(ref)
        intervals.append({"component": f"engine {fleet.ids[k]}", "start": start, "end": time.time()})
        tokens += sum(len(c.token_ids) for grp in groups for c in grp)
        completions += sum(len(grp) for grp in groups)
        if submitted < chunks:
            submit(k)
    wall = time.time() - t0
    return {
        "chunks": chunks,
        "prompts_per_chunk": chunk,
        "tokens": tokens,
        "completions": completions,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "mean_completion_tokens": tokens / max(completions, 1),
        "timeline": intervals,
        "window": [t0, t0 + wall],
        "cpu": cpu_usage(snap, cpu_snapshot()),
        "load_avg": load_avg(),
    }


def engines_alone(args: argparse.Namespace, root: Path, chunks: int, diagnostics: bool) -> dict:
    """The ceiling: `chunks` chunks back to back on a fresh fleet, then as many with the learner's core
    kept busy (the honest ceiling); with `diagnostics`, also the RPC latencies and the whole engine
    pinned to its core."""
    cfg = run_config(args, 1, root / "ceiling")
    model_path = resolve_model(cfg)
    fleet = RolloutFleet(cfg, make_plan(cfg), model_path)
    t0 = time.perf_counter()
    fleet.start(cfg.rollout.num_engines)
    out: dict = {"startup_s": time.perf_counter() - t0, "engine_env": make_plan(cfg).engine_env}
    try:
        stream = PromptStream(load_prompts(cfg.data, cfg.run.seed), cfg.run.seed, cfg.data.shuffle)
        generate_back_to_back(fleet, stream, cfg, 2 * len(fleet.engines))  # warm-up, not counted
        out["main"] = generate_back_to_back(fleet, stream, cfg, chunks * len(fleet.engines))
        with busy_core(LEARNER_CORES):
            out["learner_core_busy"] = generate_back_to_back(fleet, stream, cfg, chunks * len(fleet.engines))
        if not diagnostics:
            return out
        engine = fleet.engines[0]
        for name, call in (("actor_call", engine.load), ("worker_rpc", engine.received_digest)):
            ray.get(call.remote())
            lat = []
            for _ in range(20):
                t = time.perf_counter()
                ray.get(call.remote())
                lat.append(time.perf_counter() - t)
            out[f"{name}_latency_s_median"] = statistics.median(lat)
        lat = []
        for _ in range(10):
            t = time.perf_counter()
            ray.get(engine.pause.remote())
            ray.get(engine.resume.remote())
            lat.append(time.perf_counter() - t)
        out["pause_resume_s_median"] = statistics.median(lat)  # idle engine: the RPC floor of an update
        # Every thread of the engine's processes (front-end, EngineCore, worker) confined to core 0:
        # what the engine makes if it really stays on its own core.
        pin_tree(fleet.ready_info()[0]["pid"], ENGINE_CORES)
        out["whole_engine_on_core_0"] = generate_back_to_back(fleet, stream, cfg, chunks // 2)
    finally:
        fleet.shutdown()
    return out


# ---------------------------------------------------------------- broadcast floor
@ray.remote(num_cpus=0)
class _FloorPeer:
    def __init__(self, core: str) -> None:
        os.sched_setaffinity(0, {int(c) for c in core.split(",")})

    def endpoint(self) -> tuple[str, int]:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def run(self, address: str, port: int, rank: int, nbytes: int, reps: int, warmup: int) -> list[float]:
        """Rank 0 broadcasts a flat uint8 buffer; rank 1 acknowledges with 1 byte; times at rank 0."""
        import torch

        from actors.weight_transport import open_group

        store, group = open_group(address, port, rank, 2, 120.0)
        buf = torch.zeros(nbytes, dtype=torch.uint8) if rank else torch.ones(nbytes, dtype=torch.uint8)
        ack = torch.zeros(1, dtype=torch.uint8)
        times = []
        for i in range(warmup + reps):
            t = time.perf_counter()
            group.broadcast(buf, 0).wait()
            group.broadcast(ack, 1).wait()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        del group, store
        return times


def broadcast_floor(nbytes: int, reps: int) -> dict:
    sender = _FloorPeer.remote(LEARNER_CORES)
    receiver = _FloorPeer.remote(ENGINE_CORES)
    try:
        address, port = ray.get(sender.endpoint.remote())
        refs = [
            sender.run.remote(address, port, 0, nbytes, reps, 3),
            receiver.run.remote(address, port, 1, nbytes, reps, 3),
        ]
        times = ray.get(refs[0])
        ray.get(refs[1])
    finally:
        for a in (sender, receiver):
            ray.kill(a)
    return {"bytes": nbytes, "reps": reps, "median_s": statistics.median(times), "min_s": min(times)}


def sha256_seconds(nbytes: int) -> float:
    """One sha256 over `nbytes` (the transport hashes every bucket at both ends), median of 3."""
    import hashlib

    data = os.urandom(min(nbytes, 1 << 20)) * max(1, nbytes >> 20)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def model_nbytes(model_path: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = st.get_tensor(name)
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- (2)/(3) duet-rl runs
def union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def subtract(intervals: list[tuple[float, float]], holes: list[tuple[float, float]]) -> list[tuple]:
    out = []
    for a, b in intervals:
        pieces = [(a, b)]
        for ha, hb in holes:
            nxt = []
            for pa, pb in pieces:
                if hb <= pa or ha >= pb:
                    nxt.append((pa, pb))
                    continue
                if ha > pa:
                    nxt.append((pa, ha))
                if hb < pb:
                    nxt.append((hb, pb))
            pieces = nxt
        out += pieces
    return out


def engine_busy(timeline: list[dict], lo: float, hi: float) -> dict:
    engines = [(e["start"], e["end"]) for e in timeline if e["component"].startswith("engine")]
    bcast = [(e["start"], e["end"]) for e in timeline if e["component"] == "broadcast"]
    wall = max(hi - lo, 1e-9)
    return {
        "busy_fraction": union_length(engines, lo, hi) / wall,
        "generating_fraction": union_length(subtract(engines, bcast), lo, hi) / wall,
        "window_s": wall,
    }


def summarize_run(
    run_dir: Path, warmup: int, k: int, prompts: int, ceiling_tps: float, honest_tps: float
) -> dict:
    metrics = read_metrics(run_dir)
    timeline = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines() if line]
    measured = [m for m in metrics if m["step"] > warmup]
    step_s = [m["time/step_s"] for m in measured]
    tokens = sum(m["tokens/generated"] for m in measured)
    wall = sum(step_s)
    train_s = statistics.fmean(m["time/train_s"] for m in measured)
    tokens_per_group = sum(m["tokens/generated"] for m in measured) / max(
        sum(m["groups/total"] for m in measured), 1
    )
    tokens_needed = tokens_per_group * prompts  # per step: the trained groups' tokens
    if k == 0:
        gen_s = statistics.fmean(m["time/generate_s"] for m in measured)
        gen_source = "time/generate_s of the run"
    else:
        gen_s = tokens_needed / ceiling_tps
        gen_source = "tokens per trained batch / engines-alone tokens/s"
    bcast_ends = sorted(e["end"] for e in timeline if e["component"] == "broadcast")
    if len(bcast_ends) == len(metrics):
        lo, hi = (
            bcast_ends[warmup - 1] if warmup else bcast_ends[0] - metrics[0]["time/step_s"],
            bcast_ends[-1],
        )
    else:  # a step without a broadcast (all tied): measure back from the end
        hi = bcast_ends[-1]
        lo = hi - wall
    engine_ends = [e["end"] for e in timeline if e["component"].startswith("engine")]
    # Chunks still in flight when the run stops are never collected, so they have no interval: end the
    # busy window at the last engine interval (async) rather than count that tail as idle.
    busy_hi = min(hi, max(engine_ends)) if k else hi
    hist: dict[str, int] = {}
    for m in measured:
        for age, n in (m.get("staleness/histogram") or {"0": m["groups/trained"]}).items():
            hist[age] = hist.get(age, 0) + n
    queue = metrics[-1].get("queue", {})
    bound = max(gen_s, train_s)
    return {
        "k": k,
        "steps": len(metrics),
        "measured_steps": len(measured),
        "tokens_generated": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "throughput_ratio": tokens / wall / ceiling_tps,
        # the tokens of the groups trained on (generated minus those dropped as too stale, in steady state)
        "trained_tokens_per_s": tokens_needed * len(measured) / wall,
        "trained_throughput_ratio": tokens_needed * len(measured) / wall / honest_tps,
        "trained_throughput_ratio_vs_ceiling": tokens_needed * len(measured) / wall / ceiling_tps,
        "engine": engine_busy(timeline, lo, busy_hi),
        "step_s_mean": statistics.fmean(step_s),
        "step_s_median": statistics.median(step_s),
        "generate_s": gen_s,
        "generate_s_source": gen_source,
        "train_s_mean": train_s,
        "step_time_ratio": statistics.fmean(step_s) / bound,
        "step_time_ratio_incl_broadcast": statistics.fmean(step_s)
        / max(gen_s, train_s + statistics.fmean(m["time/broadcast_s"] for m in measured)),
        "broadcast_s_median": statistics.median(m["time/broadcast_s"] for m in measured),
        "broadcast_s_mean": statistics.fmean(m["time/broadcast_s"] for m in measured),
        "wait_data_s_mean": statistics.fmean(m.get("time/wait_data_s", 0.0) for m in measured),
        "reward_wait_s_mean": statistics.fmean(m.get("time/reward_wait_s", 0.0) for m in measured),
        "tokens_per_trained_batch": tokens_needed,
        "mean_completion_tokens": statistics.fmean(m["completions/mean_length"] for m in measured),
        "staleness_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "queue": queue,
        "stale_dropped_fraction": queue.get("dropped_stale", 0) / max(queue.get("put", 0), 1),
        "sync_checksum_match": all(m.get("sync/checksum_match") is not False for m in metrics),
        "per_step": [
            {
                key: m.get(key)
                for key in (
                    "step",
                    "time/step_s",
                    "time/generate_s",
                    "time/train_s",
                    "time/broadcast_s",
                    "time/wait_data_s",
                    "tokens/generated",
                    "groups/total",
                    "groups/trained",
                    "staleness/histogram",
                )
                if key in m
            }
            for m in metrics
        ],
        "timeline": [e for e in timeline if e["end"] >= lo and e["start"] <= hi],
        "window": [lo, hi],
    }


def cpu_snapshots(warmup: int, steps: int) -> tuple[list[dict], StepCallback]:
    """A list, and the per-step callback (`Trainer.run(on_step=...)`) that appends a CPU snapshot to it
    at the end of the warm-up and of the last step."""
    snaps: list[dict] = []

    def on_step(trainer: Trainer, metrics: dict) -> None:
        if trainer.step in (warmup, steps):
            snaps.append(cpu_snapshot())

    return snaps, on_step


def one_run(
    args: argparse.Namespace, k: int, root: Path, ceiling_tps: float, honest_tps: float, **extra: object
) -> dict:
    run_dir = root / (f"k{k}" + "".join(f"-{v}" for v in extra.values()))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config(args, k, run_dir, **extra)
    load_before = load_avg()
    t0 = time.perf_counter()
    snaps, on_step = cpu_snapshots(args.warmup, cfg.train.steps)
    Trainer(cfg, run_dir).run(on_step=on_step)
    out = summarize_run(run_dir, args.warmup, k, cfg.rollout.prompts_per_step, ceiling_tps, honest_tps)
    out["overrides"] = {key: str(v) for key, v in extra.items()}
    out["queue_capacity_groups"] = cfg.train.queue_capacity_groups
    if len(snaps) == 2:
        out["cpu"] = cpu_usage(*snaps)
    out["total_s"] = time.perf_counter() - t0
    out["load_avg"] = {"before": load_before, "after": load_avg()}
    return out


# ---------------------------------------------------------------- larger model: broadcast only
def build_larger_model(cache: Path, layers: int) -> Path:
    """The tiny model's tokenizer on a wider, deeper Llama (hidden 512, 8 heads of 64): ~13.6 MB per layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.tiny_model import VOCAB_SIZE, build_tokenizer

    final = cache / f"bench-llama-h512-l{layers}"
    if (final / "config.json").exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    build_tokenizer(tmp)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(final)
    return final


def larger_model_broadcast(args: argparse.Namespace, root: Path) -> dict:
    cache = Path(os.path.expanduser(args.model_cache))
    cache.mkdir(parents=True, exist_ok=True)
    path = build_larger_model(cache, args.large_layers)
    nbytes = model_nbytes(str(path))
    floor = broadcast_floor(nbytes, 8)
    floor["sha256_s"] = sha256_seconds(nbytes)
    run_dir = root / "large"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config(
        args,
        0,
        run_dir,
        **{
            "model.path": str(path),
            "train.steps": 5,
            "rollout.prompts_per_step": 8,
            "rollout.max_tokens": 8,
        },
    )
    t0 = time.perf_counter()
    Trainer(cfg, run_dir).run()
    bcast = [m["time/broadcast_s"] for m in read_metrics(run_dir)[1:]]
    return {
        "model": f"Llama hidden 512, {args.large_layers} layers, fp32",
        "bytes": nbytes,
        "floor": floor,
        "broadcast_s_median": statistics.median(bcast),
        "broadcast_s": bcast,
        "broadcast_floor_ratio": statistics.median(bcast) / floor["median_s"],
        "total_s": time.perf_counter() - t0,
    }


HEADLINE_KEYS = (
    "async_throughput_ratio",
    "step_time_ratio",
    "broadcast_floor_ratio",
    "stale_drop_fraction",
    "trained_throughput_ratio",
    "broadcast_fixed_ms",
    "broadcast_per_byte_ratio",
)


def broadcast_cost_model(path: Path) -> dict:
    """broadcast_fixed_ms and broadcast_per_byte_ratio from benchmarks/broadcast.py's results (None when it
    has not been run), with the date and command they were measured by."""
    if not path.exists():
        return {
            "broadcast_fixed_ms": None,
            "broadcast_per_byte_ratio": None,
            "broadcast_cost_model_from": None,
        }
    data = json.loads(path.read_text())
    return {
        "broadcast_fixed_ms": data.get("broadcast_fixed_ms"),
        "broadcast_per_byte_ratio": data.get("broadcast_per_byte_ratio"),
        "broadcast_cost_model_from": {
            "file": path.name,
            "date": data.get("date"),
            "command": data.get("command"),
        },
    }


# ---------------------------------------------------------------- plot
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("engines alone", results["engines_alone"]["main"])]
    for name, run in results["modes"].items():
        if "error" not in run:
            panels.append((name, run))
    rows = ["engine 0", "rewards", "learner", "broadcast"]
    for _, p in panels:
        for e in p["timeline"]:
            if e["component"] not in rows:
                rows.insert(0, e["component"])
    colors = {"rewards": "tab:green", "learner": "tab:orange", "broadcast": "tab:red"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 1.25 + 1.55 * len(panels)), squeeze=False)
    for ax, (name, p) in zip(axes[:, 0], panels):
        lo, hi = p["window"]
        for y, comp in enumerate(rows):
            spans = [
                (max(e["start"], lo) - lo, min(e["end"], hi) - max(e["start"], lo))
                for e in p["timeline"]
                if e["component"] == comp and e["end"] > lo and e["start"] < hi
            ]
            # overlapping engine chunks (2 in flight) drawn translucent: darker = both in flight
            ax.broken_barh(
                spans, (y - 0.38, 0.76), color=colors.get(comp, "tab:blue"), alpha=0.55, linewidth=0
            )
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlim(0, hi - lo)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        if name == "engines alone":
            title = f"engines alone: {p['tokens_per_s']:,.0f} tokens/s (the ceiling)"
        else:
            title = (
                f"{name}: {p['tokens_per_s']:,.0f} tokens/s ({p['throughput_ratio']:.2f} of ceiling), "
                f"engine busy {p['engine']['busy_fraction']:.0%}, step {p['step_s_mean']:.2f}s vs "
                f"max(gen {p['generate_s']:.2f}s, train {p['train_s_mean']:.2f}s)"
            )
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds into the measured window (warm-up steps left out)")
    fig.suptitle(
        "duet-rl pipeline on CPU: engine on core 0, learner on core 1 (tiny Llama, untrained, "
        f"{results['settings']['prompts_per_step']} prompts × {results['settings']['group_size']} per step)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per run (and batches for the ceiling)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of every figure")
    ap.add_argument("--prompts", type=int, default=128, help="rollout.prompts_per_step")
    ap.add_argument("--max-tokens", type=int, default=64, help="rollout.max_tokens")
    ap.add_argument("--warm-start-steps", type=int, default=0, help="model.warm_start_steps (0: untrained)")
    ap.add_argument("--modes", default="0,1,2", help="train.max_staleness_versions of the runs")
    ap.add_argument(
        "--capped-queue",
        type=int,
        default=0,
        help="also run async k=1 with train.queue_capacity_groups = this × prompts_per_step (0: skip)",
    )
    ap.add_argument("--large-layers", type=int, default=8, help="larger model for the broadcast (0: skip)")
    add_common_arguments(ap, quick_help="~4-minute smoke version", keep_help="keep the run folders")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.modes, args.large_layers, args.capped_queue = 4, 1, "1", 0, 0
    if args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "pipeline_quick" if args.quick else "pipeline"
    root = Path(tempfile.mkdtemp(prefix="duet-pipeline-"))
    started = datetime.now(timezone.utc)
    load_before = load_avg()
    modes: list[tuple[str, int, dict]] = [
        ("sync" if int(k) == 0 else f"async k={k}", int(k), {}) for k in args.modes.split(",")
    ]
    if args.capped_queue:
        cap = args.capped_queue * args.prompts
        modes.append((f"async k=1, queue {cap}", 1, {"train.queue_capacity_groups": cap}))
    base = run_config(args, 0, root)
    init_ray(base)
    results: dict = {"benchmark": "pipeline"}
    try:
        model_path = resolve_model(base)
        nbytes = model_nbytes(model_path)
        floor = broadcast_floor(nbytes, 10 if args.quick else 30)
        floor["sha256_s"] = sha256_seconds(nbytes)
        print(f"broadcast floor: {nbytes} B in {floor['median_s'] * 1e3:.2f} ms (median)", flush=True)
        t0 = time.perf_counter()
        alone = engines_alone(args, root, 2 * args.steps, diagnostics=False)
        ceiling = alone["main"]["tokens_per_s"]
        honest = alone["learner_core_busy"]["tokens_per_s"]
        print(
            f"engines alone: {ceiling:,.0f} tokens/s; with core {LEARNER_CORES} busy (honest ceiling): "
            f"{honest:,.0f} ({alone['main']['mean_completion_tokens']:.1f} tokens/completion)  "
            f"[{time.perf_counter() - t0:.0f}s]  cpu {alone['main']['cpu']}",
            flush=True,
        )
        runs: dict[str, dict] = {}
        for label, k, extra in modes:
            t0 = time.perf_counter()
            try:
                runs[label] = one_run(args, k, root, ceiling, honest, **extra)
                r = runs[label]
                print(
                    f"{label}: {r['tokens_per_s']:,.0f} tokens/s ({r['throughput_ratio']:.2f}; trained "
                    f"{r['trained_throughput_ratio']:.2f} of the honest ceiling), engine busy "
                    f"{r['engine']['busy_fraction']:.2f}, step {r['step_s_mean']:.2f}s vs max(gen "
                    f"{r['generate_s']:.2f}, train {r['train_s_mean']:.2f}) = {r['step_time_ratio']:.2f}, "
                    f"broadcast {r['broadcast_s_median'] * 1e3:.0f} ms, staleness {r['staleness_histogram']}, "
                    f"stale-dropped {r['stale_dropped_fraction']:.2f}, cpu {r.get('cpu', {}).get('cores_used_by_role')}"
                    f"  [{time.perf_counter() - t0:.0f}s]",
                    flush=True,
                )
            except Exception as e:
                traceback.print_exc()
                runs[label] = {"k": k, "error": f"{type(e).__name__}: {e}"}
        after = None
        if not args.quick:
            t0 = time.perf_counter()
            try:
                after = engines_alone(args, root, args.steps, diagnostics=True)
                print(
                    f"engines alone, again: {after['main']['tokens_per_s']:,.0f} tokens/s; with core "
                    f"{LEARNER_CORES} busy: {after['learner_core_busy']['tokens_per_s']:,.0f}; whole engine on "
                    f"core {ENGINE_CORES}: {after['whole_engine_on_core_0']['tokens_per_s']:,.0f}; pause+resume "
                    f"{after['pause_resume_s_median'] * 1e3:.1f} ms  [{time.perf_counter() - t0:.0f}s]",
                    flush=True,
                )
            except Exception as e:
                traceback.print_exc()
                after = {"error": f"{type(e).__name__}: {e}"}
        large = None
        if args.large_layers:
            try:
                large = larger_model_broadcast(args, root)
                print(
                    f"larger model ({large['bytes'] / 2**20:.0f} MiB): broadcast "
                    f"{large['broadcast_s_median']:.3f}s vs floor {large['floor']['median_s']:.3f}s "
                    f"= {large['broadcast_floor_ratio']:.2f}",
                    flush=True,
                )
            except Exception as e:
                traceback.print_exc()
                large = {"error": f"{type(e).__name__}: {e}"}
    finally:
        ray.shutdown()
        if not args.keep_runs:
            shutil.rmtree(root, ignore_errors=True)

    headline = runs.get("async k=1", {})
    ok = "error" not in headline and bool(headline)
    results.update(
        {
            "async_throughput_ratio": headline.get("throughput_ratio") if ok else None,
            "step_time_ratio": headline.get("step_time_ratio") if ok else None,
            "broadcast_floor_ratio": headline["broadcast_s_median"] / floor["median_s"] if ok else None,
            "stale_drop_fraction": headline.get("stale_dropped_fraction") if ok else None,
            "trained_throughput_ratio": headline.get("trained_throughput_ratio") if ok else None,
            **broadcast_cost_model(out_dir / "broadcast.json"),
        }
    )
    if ok:
        results["goals"] = {
            **GOALS,
            "met": {
                "async_throughput_ratio": results["async_throughput_ratio"]
                >= GOALS["async_throughput_ratio_min"],
                "step_time_ratio": results["step_time_ratio"] <= GOALS["step_time_ratio_max"],
                "broadcast_floor_ratio": results["broadcast_floor_ratio"]
                <= GOALS["broadcast_floor_ratio_max"],
                "stale_drop_fraction": results["stale_drop_fraction"] <= GOALS["stale_drop_fraction_max"],
                "trained_throughput_ratio": results["trained_throughput_ratio"]
                >= GOALS["trained_throughput_ratio_min"],
            },
        }
    results.update(
        {
            "engines_alone_tokens_per_s": ceiling,
            "honest_ceiling_tokens_per_s": honest,
            "broadcast_floor": floor,
            "engines_alone": alone,
            "engines_alone_after_runs": after,
            "modes": runs,
            "larger_model_broadcast": large,
            "settings": {
                "steps": args.steps,
                "warmup_steps_left_out": args.warmup,
                "prompts_per_step": args.prompts,
                "group_size": base.rollout.group_size,
                "max_tokens": args.max_tokens,
                "model": f"embedded tiny Llama, model.warm_start_steps={args.warm_start_steps}, fp32",
                "model_bytes": nbytes,
                "engine_cores": ENGINE_CORES,
                "learner_cores": LEARNER_CORES,
                "overrides": [
                    "model.warm_start_steps",
                    "algorithm.filter_tied=false",
                    f"rollout.cpu_threads_bind={ENGINE_CORES}",
                    f"learner.cpu_affinity={LEARNER_CORES}",
                    "run.cpu_cores=2",
                    "control.enabled=false",
                    "checkpoint.final=false",
                ],
                "ceiling": "the fleet's engine alone, 2 chunks of prompts_per_step//2 in flight (as the "
                "async producer), deterministic=False, steps × prompts_per_step prompts after 1 warm-up round",
                "honest_ceiling": f"the same, again, with core {LEARNER_CORES} kept busy by a pinned matmul "
                "loop (the engine cannot borrow the learner's core)",
                "stale_drop_fraction": "async k=1: the queue's dropped_stale ÷ put over the whole run",
                "trained_throughput_ratio": "async k=1: tokens per trained batch × measured steps ÷ their "
                "wall time ÷ the honest ceiling's tokens/s",
                "broadcast_fixed_ms, broadcast_per_byte_ratio": "copied from broadcast.json "
                "(benchmarks/broadcast.py; see broadcast_cost_model_from for its date)",
                "tokens_per_s": "Σ tokens/generated ÷ Σ time/step_s over the measured steps",
                "engine_busy": "union of timeline engine intervals (chunk submitted → result) over the "
                "measured window; generating_fraction also removes the broadcasts (engine paused)",
                "generation_time": "sync: time/generate_s; async: tokens per trained batch ÷ ceiling tokens/s",
                "broadcast_floor": "median of one gloo broadcast of a flat uint8 buffer of the model's bytes "
                f"(core {LEARNER_CORES} → core {ENGINE_CORES}) + a 1-byte ack; time/broadcast_s also "
                "includes packing, sha256 at both ends, vLLM's pause/resume, load_weights with the "
                "layerwise reload, and 3 RPC rounds into the engine",
            },
            **provenance("pipeline.py", argv, started, load_before),
        }
    )
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in HEADLINE_KEYS}))
    print(f"results written to {json_path}")
    plot(results, out_dir / f"{name}.png")
    print(f"plot written to {out_dir / f'{name}.png'}")
    return 0 if all("error" not in r for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

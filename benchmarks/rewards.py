"""Reward verification throughput and latency: RewardPool with 1..M workers on a realistic mix.

    python benchmarks/rewards.py [--workers 1,2] [--items 400] [--hostile-frac 0.02] [--timeout-s 2]

For each worker count it scores the same items (mostly normal answers with some reasoning text:
integers, fractions, roots, intervals, sets, percentages; right, wrong and unboxed; plus a few
hostile completions that hit the time limit) through a real RewardPool on a local Ray cluster, and
reports verifications per second, the scaling ratio throughput(M) / (M × throughput(1)), p50/p99
per-item latency (the sandbox's elapsed_s) and how many items hit the time limit. A normal-only
pass measures the CPU-bound scaling separately (hostile items mostly wait on the kill deadline).

Goals: scaling ≥ 0.8 of linear up to the machine's cores; p99 ≤ timeout_s + 0.5 s with hostile
items. Results go to benchmarks/results/rewards.json with the machine, the date and the command.
Numbers are noisy when other processes load the CPU: the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from cluster.config import RewardsConfig  # noqa: E402
from cluster.records import VerifyItem, VerifyResult  # noqa: E402
from rewards.pool import RewardPool  # noqa: E402

HOSTILE = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{(10!)!}",
    "\\boxed{" + "(" * 60 + "1" + ")" * 60 + "}",
    "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "\\boxed{\\sum_{k=1}^{10^{12}} k^{k}}",
    "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "\\boxed{\\binom{10^{9}}{10^{8}}}",
    "\\boxed{\\int_0^\\infty e^{-x^{100}} \\sin(x^{50}) dx}",
]

FILLER = (
    "Let me work through this step by step. First I rewrite the expression, then I simplify each "
    "term and check the edge cases. Combining the pieces, "
)


def normal_item(rng: random.Random) -> VerifyItem:
    """An answer as a model writes it: some reasoning, then a boxed answer in one of many forms."""
    kind = rng.randrange(8)
    a, b = rng.randint(1, 60), rng.randint(2, 60)
    if kind == 0:
        ref, right, wrong = str(a + b), str(a + b), str(a + b + 1)
    elif kind == 1:
        ref, right, wrong = (
            f"\\frac{{{a}}}{{{b}}}",
            f"\\dfrac{{{2 * a}}}{{{2 * b}}}",
            f"\\frac{{{a + 1}}}{{{b}}}",
        )
    elif kind == 2:
        ref, right, wrong = f"{a}\\sqrt{{2}}", f"\\sqrt{{{2 * a * a}}}", f"{a}\\sqrt{{3}}"
    elif kind == 3:
        ref, right, wrong = f"[{a}, {a + b}]", f"[{a},{a + b}]", f"({a},{a + b}]"
    elif kind == 4:
        ref, right, wrong = f"\\{{{a},{b}\\}}", f"\\{{{b},{a}\\}}", f"\\{{{a},{b + 1}\\}}"
    elif kind == 5:
        ref, right, wrong = f"{a}\\%", f"{a / 100:g}", f"{(a + 1) / 100:g}"
    elif kind == 6:
        ref, right, wrong = f"{a}.5", f"\\frac{{{2 * a + 1}}}{{2}}", f"{a}.05"
    else:
        ref, right, wrong = f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2", f"(x-{a})^2"
    text = FILLER * rng.randint(1, 8)
    roll = rng.random()
    if roll < 0.45:
        return VerifyItem(f"{text}the answer is \\boxed{{{right}}}.", ref)
    if roll < 0.9:
        return VerifyItem(f"{text}the answer is \\boxed{{{wrong}}}.", ref)
    return VerifyItem(f"{text}so I believe the answer is {right}.", ref)  # forgot the box


def make_items(n: int, hostile_frac: float, seed: int) -> list[VerifyItem]:
    rng = random.Random(seed)
    items = [normal_item(rng) for _ in range(n)]
    n_hostile = round(n * hostile_frac)
    for k, pos in enumerate(rng.sample(range(n), n_hostile)):
        items[pos] = VerifyItem(HOSTILE[k % len(HOSTILE)], "1")
    return items


def measure(pool: RewardPool, items: list[VerifyItem], timeout_s: float) -> dict:
    t0 = time.perf_counter()
    results: list[VerifyResult] = pool.score(items)
    wall = time.perf_counter() - t0
    lat = sorted(r.elapsed_s for r in results)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, round(p * (len(lat) - 1)))]

    return {
        "items": len(items),
        "wall_s": round(wall, 3),
        "items_per_s": round(len(items) / wall, 1),
        "p50_s": round(pct(0.50), 4),
        "p99_s": round(pct(0.99), 4),
        "max_s": round(lat[-1], 4),
        "mean_s": round(statistics.fmean(lat), 4),
        "timeouts": sum(r.reason == "timeout" for r in results),
        "reasons": dict(Counter(r.reason for r in results)),
        "p99_within_goal": pct(0.99) <= timeout_s + 0.5,
    }


def main(argv: list[str] | None = None) -> int:
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default=",".join(str(m) for m in range(1, cores + 1)), help="e.g. 1,2,4")
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--hostile-frac", type=float, default=0.02)
    ap.add_argument("--timeout-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-normal-only", action="store_true", help="skip the normal-only scaling pass")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rewards.json"))
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",") if x.strip()]

    mixed = make_items(args.items, args.hostile_frac, args.seed)
    normal = make_items(args.items, 0.0, args.seed + 1)
    load_start = os.getloadavg()
    ray.init(num_cpus=max(cores, max(counts)), include_dashboard=False, log_to_driver=False)
    runs, normal_runs = [], []
    try:
        for m in counts:
            cfg = RewardsConfig(num_workers=m, timeout_s=args.timeout_s)
            pool = RewardPool(cfg)
            try:
                pool.score(make_items(8 * m, 0.0, 99))  # warm: Ray calls, sympy caches
                run = {"workers": m, **measure(pool, mixed, args.timeout_s)}
                runs.append(run)
                print(f"mixed   M={m}: {run['items_per_s']:7.1f} items/s  p50 {run['p50_s']:.4f}s  "
                      f"p99 {run['p99_s']:.3f}s  timeouts {run['timeouts']}", flush=True)  # fmt: skip
                if not args.no_normal_only:
                    nrun = {"workers": m, **measure(pool, normal, args.timeout_s)}
                    normal_runs.append(nrun)
                    print(f"normal  M={m}: {nrun['items_per_s']:7.1f} items/s  p50 {nrun['p50_s']:.4f}s  "
                          f"p99 {nrun['p99_s']:.3f}s", flush=True)  # fmt: skip
            finally:
                pool.shutdown()
    finally:
        ray.shutdown()
    for series in (runs, normal_runs):
        base = next((r["items_per_s"] for r in series if r["workers"] == 1), None)
        for r in series:
            r["scaling"] = round(r["items_per_s"] / (r["workers"] * base), 3) if base else None

    report = {
        "benchmark": "reward verification (RewardPool, math verifier)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [*sys.argv[:1], *(argv or sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": cores,
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "items": args.items,
            "hostile_frac": args.hostile_frac,
            "hostile_items": round(args.items * args.hostile_frac),
            "timeout_s": args.timeout_s,
            "seed": args.seed,
        },
        "goals": {"scaling_min": 0.8, "p99_max_s": args.timeout_s + 0.5},
        "mixed": runs,
        "normal_only": normal_runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

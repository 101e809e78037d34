"""Crash sweep: every fault point of cluster/faults.py, one run each, killed there and resumed.

    python benchmarks/crash_sweep.py [--points P1,P2] [--step 2] [--out benchmarks/results/crash_sweep.json]
    python benchmarks/crash_sweep.py --continue --budget-s 1200   # the points --out does not hold yet

The results file is rewritten after each point; with `--continue` the points it already holds (same run
settings and step) are kept and not run again, so the sweep can be run in chunks.

For each point: a fresh `duet train` (3 steps, a checkpoint every step) whose driver SIGKILLs its
process group at the point at `--step`; then `duet train --resume` until the run finishes (resume.after_load
is a point of the resumed run: there the first launch is killed mid-step, the first resume at the point,
and a second resume finishes). Checked each time (tests/test_crash_consistency.py's checks): the kill
landed at the point, no half-written checkpoint is loaded, metrics.jsonl holds exactly one valid row per
step, every prompt follows an uninterrupted run's order and none is trained twice, the learner stepped
once per trained step, TensorBoard shows each step once. Heavy (two or three launches per point): run it
alone, under the shared lock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.checkpoints import checkpoint_step, complete_checkpoints  # noqa: E402
from cluster.faults import POINTS  # noqa: E402
from tests.test_crash_consistency import check_after_kill, check_finished, launch, metric_lines  # noqa: E402

RUN = ["train.steps=3", "rollout.prompts_per_step=8", "checkpoint.every_steps=1", "run.progress=false"]


def sweep_one(point: str, step: int, root: Path, model_cache: Path) -> dict:
    run = root / point.replace(".", "_")
    out: dict = {"point": point, "step": step, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "launches": []}
    t0 = time.perf_counter()
    try:
        faults = [f"{point}:{step}", None]
        if point == "resume.after_load":
            faults = [f"step.after_learn:{step}", f"{point}:{step - 1}", None]
        first = True
        for fault in faults:
            resume_from = None if first else complete_checkpoints(run)[-1]
            args = ["--run-dir", str(run), *RUN] if first else ["--resume", str(run)]
            rc, err = launch(run, *args, fault=fault, model_cache=model_cache, timeout_s=600)
            launch_info = {"fault": fault, "rc": rc}
            if resume_from is not None:
                launch_info["resumed_from_step"] = checkpoint_step(resume_from)
                assert f"resuming from {resume_from} " in err, err[-2000:]
            if fault is not None:
                rows_before = len(metric_lines(run))
                check_after_kill(run, rc, err, fault)
                launch_info["metrics_lines_at_kill"] = rows_before
                launch_info["tmp_checkpoints_left"] = (
                    sorted(p.name for p in (run / "checkpoints").glob(".tmp-*"))
                    if (run / "checkpoints").exists()
                    else []
                )
            else:
                assert rc == 0, err[-3000:]
            out["launches"].append(launch_info)
            first = False
        check_finished(run, RUN)
        killed_at = step
        resumed = [x["resumed_from_step"] for x in out["launches"] if "resumed_from_step" in x]
        out.update(ok=True, steps_redone=max(0, killed_at - min(resumed)) if resumed else 0)
    except Exception as e:  # recorded, and the sweep goes on with the next point
        out.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def previous_results(out: Path, step: int) -> list[dict]:
    """The per-point results `out` holds from an earlier (partial) sweep with the same settings; none when
    it does not exist or was run with other settings (those results would not compare)."""
    if not out.exists():
        return []
    old = json.loads(out.read_text())
    if old.get("run") != RUN:
        print(f"{out}: run with other settings ({old.get('run')}): starting afresh", flush=True)
        return []
    return [r for r in old.get("results", []) if r.get("step") == step]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default=",".join(POINTS), help="comma-separated fault points")
    ap.add_argument("--step", type=int, default=2, help="the step at which each point fires (2 or 3)")
    ap.add_argument(
        "--model-cache",
        default=os.environ.get("DUET_TEST_MODEL_CACHE") or str(Path("~/.cache/duet-rl").expanduser()),
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new point when less than --point-s of this budget is left (partial results are kept)",
    )
    ap.add_argument("--point-s", type=float, default=300.0, help="what one point may take, for --budget-s")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "crash_sweep.json"))
    ap.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="keep the points --out already holds (same run settings and --step) and run only the others",
    )
    args = ap.parse_args()
    points = [p for p in args.points.split(",") if p]
    unknown = [p for p in points if p not in POINTS]
    if unknown:
        ap.error(f"--points: {unknown} are not fault points; they are {list(POINTS)}")
    results = previous_results(Path(args.out), args.step) if args.resume else []
    done = {r["point"] for r in results}
    points = [p for p in POINTS if p in points or p in done]  # the order a step reaches them
    with tempfile.TemporaryDirectory(prefix="duet-crash-sweep-") as d:
        t0 = time.monotonic()
        for point in points:
            if point in done:
                print(f"{point}:{args.step}: kept from {args.out}", flush=True)
                continue
            if args.budget_s is not None and time.monotonic() - t0 + args.point_s > args.budget_s:
                print(f"{point}: not run (--budget-s {args.budget_s:.0f} s spent)", flush=True)
                continue
            r = sweep_one(point, args.step, Path(d), Path(args.model_cache))
            r["command"] = "python " + shlex.join(
                ["benchmarks/crash_sweep.py", *sys.argv[1:]]
            )  # --continue merges runs
            print(
                f"{point}:{args.step}: {'ok' if r['ok'] else 'FAILED ' + r['error']} ({r['seconds']} s)",
                flush=True,
            )
            results.append(r)
            results.sort(key=lambda r: POINTS.index(r["point"]))
            summary = {
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),  # of the last point run; each has its own
                "machine": f"{platform.machine()}, {platform.processor() or ''} {Path('/proc/cpuinfo').read_text().count('processor')} cores",
                "run": RUN,
                "points_tried": len(results),
                "points_survived": sum(r["ok"] for r in results),
                "points_not_run": [p for p in POINTS if p not in {r["point"] for r in results}],
                "lost": "nothing" if all(r["ok"] for r in results) else "see failed points",
                "results": results,
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(
                json.dumps(summary, indent=1) + "\n"
            )  # after each point: partial runs count
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

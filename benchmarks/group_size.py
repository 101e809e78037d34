"""The paper's claim in a miniature that can hold it: does 2-GRPO reach 16-GRPO's plateau? (issue 14)

    python benchmarks/group_size.py all      # gate → pilot → seeds → report; resumable, run by run
    python benchmarks/group_size.py gate     # the validity gate's first half: the base policy's accuracy
    python benchmarks/group_size.py pilot    # 2 epochs, every learning rate of the grid, one seed
    python benchmarks/group_size.py seeds [--seeds N]   # the evaluation seeds at the pilot's choices
    python benchmarks/group_size.py report   # aggregate the run files → group_size.{json,png}
    python benchmarks/group_size.py smoke    # one short run per configuration (step times), scratch only
    python benchmarks/group_size.py plan     # the time budget from the smoke's step times
    common options: [--config benchmarks/group_size.yaml] [--model-cache DIR] [--runs-dir DIR]

Everything that defines the experiment (task, splits, warm start, protocol, evaluation schedule, the
pilot's learning-rate grid, seeds, gate and goal) is in benchmarks/group_size.yaml, committed before
the first seed ran; every run file records that file's sha256 and the report refuses to mix settings.

Task (benchmarks/arithmetic_task.py): two-digit addition and subtraction, four disjoint splits
(held-out 512, validation 512, RL training 2048, warm start 4096; a+b and b+a in the same split).
Base policy: the embedded tiny Llama's architecture and tokenizer, trained supervised on the warm-start
split only. Answers are checked by the project's math verifier (rewards.verifier=math).

Protocol: both configurations make 16·P rollouts per optimizer step; 16-GRPO takes P prompts × 16,
2-GRPO 8P prompts × 2; both run E epochs over the same 2048 problems, so 16-GRPO makes 8× the steps
and the rollouts. Presets `16-grpo` / `2-grpo` (clip 0.2/0.28, tied groups dropped), temperature 1.0.
Learning rates: the pilot runs every rate of the grid for each configuration (pilot.epochs, seed
pilot.seed) and takes, per configuration, the best by validation-split avg@n; the seeds run at those.
The seeds run interleaved (2-GRPO seed s, 16-GRPO seed s, 2-GRPO seed s+1, ...) so machine load hits
both alike; every run records the 1-minute load average at every step.

Timing: training wall-clock = the sum of the driver's time/step_s (generate, reward wait, train,
broadcast, bookkeeping); engine/learner start-up and the evaluations (run from the step callback,
between steps) are timed apart and excluded. Evaluations: avg@n_curve on the held-out set at the same
step numbers for both (every every_steps_early steps up to 2-GRPO's last step, every every_steps_late
after), and avg@n_final / pass@k at the last step.

Resumable: one JSON file per run in --runs-dir (default benchmarks/results/group_size_runs/); a run
whose file exists is skipped, so an interrupted benchmark goes on where it stopped.

Report (benchmarks/results/group_size.{json,png}): per configuration the final held-out avg@n_final and
pass@k, mean and 95% t-interval over seeds; accuracy_gap (16-GRPO − 2-GRPO, points, paired by seed) with
its interval; time_ratio and rollout_ratio (2-GRPO / 16-GRPO); accuracy at equal training wall-clock;
the tied-group fraction against its prediction p^G + (1 − p)^G; lr_sweep; the gate's verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# First, even when PYTHONPATH holds it already: the script's own folder (sys.path[0]) has a rewards.py
# that would shadow the rewards package.
sys.path[:] = [str(ROOT), *(p for p in sys.path if p != str(ROOT))]

from benchmarks.arithmetic_task import ensure_warm_model, split_problems, write_splits  # noqa: E402
from benchmarks.common import RESULTS, provenance  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "group_size.yaml"
SPLIT = {
    "generate": "time/generate_s",
    "reward_wait": "time/reward_wait_s",  # scoring overlaps generation: only the wait after it
    "train": "time/train_s",
    "broadcast": "time/broadcast_s",
}
# Two-sided 95% Student t quantiles by degrees of freedom (for intervals over a handful of seeds).
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    19: 2.093,
    29: 2.045,
}


# ---------------------------------------------------------------- settings (pure)


def load_settings(path: Path) -> dict:
    """The committed settings, checked against what issue 14 asks of the experiment."""
    import yaml

    text = path.read_text()
    s = yaml.safe_load(text)
    s["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    t, p = s["task"], s["protocol"]
    problems = []
    if t["train"] < 2000:
        problems.append(f"task.train: {t['train']} < 2000 distinct training problems")
    if t["held_out"] < 500:
        problems.append(f"task.held_out: {t['held_out']} < 500 held-out problems")
    if t["train"] % (8 * p["prompts_per_step_16"]):
        problems.append(
            "task.train must be a multiple of 8 × protocol.prompts_per_step_16 (whole 2-GRPO steps)"
        )
    if steps_of(s, 2) < 150:
        problems.append(f"2-GRPO makes {steps_of(s, 2)} optimizer steps (< 150): raise epochs or train")
    for g in ("2", "16"):
        if len(s["pilot"]["lr"][g]) < 3:
            problems.append(f"pilot.lr.{g}: fewer than 3 learning rates")
    if len(s["seeds"]) < 5:
        problems.append("seeds: fewer than 5")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return s


def prompts_of(s: dict, g: int) -> int:
    p16 = s["protocol"]["prompts_per_step_16"]
    return p16 if g == 16 else 8 * p16


def steps_of(s: dict, g: int, epochs: int | None = None) -> int:
    return (epochs or s["protocol"]["epochs"]) * s["task"]["train"] // prompts_of(s, g)


def eval_steps(s: dict, total_steps: int) -> list[int]:
    """The steps after which the held-out curve is measured: the same numbers for both configurations
    (dense while 2-GRPO runs, sparse after), and the last step."""
    e = s["evaluation"]
    horizon = steps_of(s, 2)
    early = range(e["every_steps_early"], min(horizon, total_steps) + 1, e["every_steps_early"])
    late = range(e["every_steps_late"], total_steps + 1, e["every_steps_late"])
    return sorted({*early, *(x for x in late if x > horizon), total_steps})


def run_name(phase: str, g: int, lr: float, seed: int) -> str:
    return f"{phase}-g{g}-lr{lr:g}-seed{seed}"


# ---------------------------------------------------------------- statistics (pure)


def mean_ci(values: list[float]) -> dict:
    """Mean and 95% t-interval half-width (None below two values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    m = statistics.fmean(values)
    if n < 2:
        return {"mean": m, "ci95": None, "n": n}
    df = n - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]
    return {
        "mean": m,
        "ci95": t * statistics.stdev(values) / math.sqrt(n),
        "n": n,
        "sd": statistics.stdev(values),
    }


def tie_prediction(histogram: list[int], g: int) -> float | None:
    """Expected share of tied groups of size g over problems whose eval had c of n correct (histogram[c]
    problems): mean of P(all g correct) + P(all g wrong), unbiased (sampling without replacement from the
    n samples) when n >= g; None when n < g."""
    n = len(histogram) - 1
    if n < g or not sum(histogram):
        return None
    total = sum(
        count * (math.comb(c, g) + math.comb(n - c, g)) / math.comb(n, g) for c, count in enumerate(histogram)
    )
    return total / sum(histogram)


def interp(curve: list[dict], key: str, x: float, y: str = "avg@n") -> float:
    """A curve's y at x (linear between evaluations; clamped at the ends)."""
    pts = sorted((p[key], p[y]) for p in curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


# ---------------------------------------------------------------- one run


class Recorder:
    """The run's bookkeeping, as the driver's per-step callback (`Trainer.run(on_step=...)`): held-out
    evaluations at the scheduled steps (between steps, so outside time/step_s), the time split, the
    rollouts, the tied-group fraction and the load average at every step."""

    def __init__(self, schedule: list[int], n_curve: int, n_final: int) -> None:
        self.schedule, self.n_curve, self.n_final = set(schedule), n_curve, n_final
        self.curve: list[dict] = []
        self.final: dict = {}
        self.train_reward: list[float] = []
        self.tied: list[float] = []
        self.load: list[float] = []
        self.step_s: list[float] = []
        self.held_out: list | None = None
        self.loop_s = self.eval_s = self.startup_s = 0.0
        self.rollouts = 0
        self.split = dict.fromkeys([*SPLIT, "other"], 0.0)
        self._t0 = time.perf_counter()

    def __call__(self, trainer, m: dict) -> None:
        if trainer.step == 0:  # after start-up: the base policy
            self.startup_s = time.perf_counter() - self._t0
            self.evaluate(trainer, self.n_curve)
            return
        self.loop_s += m["time/step_s"]
        self.step_s.append(round(m["time/step_s"], 4))
        self.rollouts += m["rollouts"]
        self.train_reward.append(round(m["reward/mean"], 4))
        self.tied.append(round(m["reward/tied_fraction"], 4))
        self.load.append(round(os.getloadavg()[0], 2))
        parts = {name: m.get(key, 0.0) for name, key in SPLIT.items()}
        parts["other"] = m["time/step_s"] - sum(parts.values())
        for name, v in parts.items():
            self.split[name] += v
        if trainer.step == trainer.cfg.train.steps:
            self.final = self.evaluate(trainer, self.n_final)
        elif trainer.step in self.schedule:
            self.evaluate(trainer, self.n_curve)

    def evaluate(self, trainer, n: int) -> dict:
        """Trainer.evaluate's work with the per-problem counts kept (the tie prediction needs them)."""
        from cluster.evaluation import generate, summarize
        from cluster.scoring import Scoring

        cfg, t0 = trainer.cfg, time.perf_counter()
        if (
            self.held_out is None
        ):  # read once per run; not trainer.eval_set, which turns on the driver's evals
            from cluster.evaluation import eval_prompts

            self.held_out = eval_prompts(cfg)
        prompts = self.held_out
        groups = generate(trainer.fleet, prompts, n, cfg.eval.sampling())
        counts = [
            sum(r == "correct" for r in sg.reasons)
            for sg in Scoring(trainer.rewards, prompts, groups, cfg.rewards.verifier).result()
        ]
        records = [
            {"source": p.source, "n": n, "correct": c, "lengths": [0], "truncated": 0}
            for p, c in zip(prompts, counts)
        ]
        overall = summarize(records)
        self.eval_s += time.perf_counter() - t0
        point = {"step": trainer.step, "rollouts": self.rollouts, "wall_s": round(self.loop_s, 3), "n": n}
        point.update({k: v for k, v in overall["overall"].items() if k.startswith(("avg@", "pass@"))})
        point["by_source"] = {src: m["avg@n"] for src, m in overall["by_source"].items()}
        point["histogram"] = [counts.count(c) for c in range(n + 1)]
        self.curve.append(point)
        return point


def run_config(
    s: dict,
    files: dict,
    model: str,
    g: int,
    lr: float,
    seed: int,
    steps: int,
    eval_file: Path,
    run_dir: Path,
    n_curve: int,
):
    from cluster.config import load_config

    p = s["protocol"]
    overrides = [
        f"run.seed={seed}",
        f"run.run_dir={run_dir}",
        "run.progress=false",
        "run.ray_metrics=false",
        "checkpoint.final=false",
        "control.enabled=false",
        f"model.path={model}",
        f"data.path={files['train']}",
        f"rollout.prompts_per_step={prompts_of(s, g)}",
        f"rollout.temperature={p['rollout_temperature']}",
        f"rollout.max_tokens={p['max_tokens']}",
        "rewards.verifier=math",
        f"learner.lr={lr}",
        f"train.steps={steps}",
        f"eval.path={eval_file}",
        "eval.every_steps=0",  # the Recorder evaluates on its own schedule
        f"eval.samples_per_prompt={n_curve}",
    ]
    return load_config(overrides=overrides, preset=f"{g}-grpo")


def one_run(
    ctx: dict,
    phase: str,
    g: int,
    lr: float,
    seed: int,
    steps: int,
    eval_split: str,
    n_final: int,
    schedule: list[int] | None = None,
    n_curve: int | None = None,
) -> dict:
    from cluster.driver import Trainer

    s = ctx["settings"]
    n_curve = n_curve or s["evaluation"]["n_curve"]
    run_dir = ctx["scratch"] / run_name(phase, g, lr, seed)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted before its result file: start it over
    run_dir.mkdir(parents=True)
    cfg = run_config(
        s, ctx["files"], ctx["model"], g, lr, seed, steps, ctx["files"][eval_split], run_dir, n_curve
    )
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    rec = Recorder(eval_steps(s, steps) if schedule is None else schedule, n_curve, n_final)
    Trainer(cfg, run_dir).run(on_step=rec)
    return {
        "phase": phase,
        "group_size": g,
        "seed": seed,
        "lr": lr,
        "settings_sha256": s["sha256"],
        "eval_split": eval_split,
        "prompts_per_step": cfg.rollout.prompts_per_step,
        "steps": steps,
        "final": {k: v for k, v in rec.final.items() if k != "histogram"},
        "final_histogram": rec.final.get("histogram"),
        "base": {k: v for k, v in rec.curve[0].items() if k != "histogram"},
        "train_wall_s": rec.loop_s,
        "time_split_s": rec.split,
        # the first step carries one-off costs (first broadcast, warm-up); the median of the rest is
        # the per-step cost the budget is sized from
        "step_s_median": statistics.median(rec.step_s[1:] or rec.step_s) if rec.step_s else None,
        "step_s": rec.step_s,
        "rollouts": rec.rollouts,
        "startup_s": rec.startup_s,
        "eval_s": rec.eval_s,
        "total_s": time.perf_counter() - t0,
        "load_avg": {
            "before": load_before,
            "after": [round(x, 2) for x in os.getloadavg()],
            "per_step_mean": statistics.fmean(rec.load) if rec.load else None,
            "per_step_max": max(rec.load, default=None),
        },
        "curve": rec.curve,
        "train_reward": rec.train_reward,
        "tied_fraction": rec.tied,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- phases


def prepare(args: argparse.Namespace) -> dict:
    """Settings, the split files and the warm-started model (built once, cached)."""
    s = load_settings(Path(args.config))
    t = s["task"]
    splits = split_problems(
        t["max_operand"],
        {k: t[k] for k in ("held_out", "validation", "train", "warm_start")},
        t["split_seed"],
    )
    data_dir = Path(os.path.expanduser(args.model_cache)) / f"group-size-task-{s['sha256'][:12]}"
    files = write_splits(splits, data_dir)
    w = s["warm_start"]
    t0 = time.perf_counter()
    model = ensure_warm_model(
        args.model_cache, splits["warm_start"], w["steps"], w["lr"], w["batch"], w["seed"]
    )
    print(
        f"task files in {data_dir}; warm-started model {model} ({time.perf_counter() - t0:.0f} s)", flush=True
    )
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    return {"settings": s, "files": files, "model": str(model), "runs_dir": runs_dir, "args": args}


def result_path(ctx: dict, name: str) -> Path:
    return ctx["runs_dir"] / f"{name}.json"


def finished(ctx: dict, name: str) -> dict | None:
    path = result_path(ctx, name)
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    if run.get("settings_sha256") != ctx["settings"]["sha256"]:
        raise SystemExit(
            f"{path} was made under other settings (sha256 {run.get('settings_sha256')}, now "
            f"{ctx['settings']['sha256']}): move the old run files away before running again"
        )
    return run


def save(ctx: dict, name: str, run: dict) -> None:
    path = result_path(ctx, name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(path)


def with_ray(ctx: dict, jobs: list[tuple[str, dict]]) -> list[dict]:
    """Run the jobs not yet finished, in order, in one Ray instance; each result is saved as it ends."""
    todo = [(name, kw) for name, kw in jobs if finished(ctx, name) is None]
    if todo:
        import ray

        from cluster.config import load_config
        from cluster.runtime import init_ray

        ctx["scratch"] = Path(tempfile.mkdtemp(prefix="duet-group-size-"))
        init_ray(load_config(overrides=[f"model.path={ctx['model']}"]))
        try:
            for name, kw in todo:
                t0 = time.perf_counter()
                try:
                    run = one_run(ctx, **kw)
                except Exception as e:  # recorded, not saved: a rerun tries it again
                    traceback.print_exc()
                    print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                save(ctx, name, run)
                print(
                    f"{name}: final avg@{run['final'].get('n')} {run['final'].get('avg@n', float('nan')):.3f} "
                    f"(base {run['base']['avg@n']:.3f}), {run['steps']} steps, train {run['train_wall_s']:.1f} s "
                    f"({run['train_wall_s'] / run['steps']:.3f} s/step), start-up {run['startup_s']:.0f} s, "
                    f"eval {run['eval_s']:.0f} s, load {run['load_avg']['per_step_mean']:.1f} "
                    f"[{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
        finally:
            ray.shutdown()
            shutil.rmtree(ctx["scratch"], ignore_errors=True)
    out = []
    for name, _ in jobs:
        run = finished(ctx, name)
        if run is not None:
            out.append(run)
    return out


def gate(ctx: dict) -> dict:
    """The base policy's held-out avg@n_final (the engines and the verifier, as every evaluation)."""
    path = ctx["runs_dir"] / "gate.json"
    if path.exists():
        g = json.loads(path.read_text())
        if g.get("settings_sha256") == ctx["settings"]["sha256"]:
            return g
    from cluster.evaluation import eval_main

    s = ctx["settings"]
    n = s["evaluation"]["n_final"]
    out = Path(tempfile.mkdtemp(prefix="duet-gate-")) / "base.json"
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    rc = eval_main(
        [
            "--model",
            ctx["model"],
            "--dataset",
            str(ctx["files"]["held_out"]),
            "--out",
            str(out),
            f"eval.samples_per_prompt={n}",
            f"rollout.max_tokens={s['protocol']['max_tokens']}",
            "rewards.verifier=math",
            "run.ray_metrics=false",
        ]
    )
    if rc != 0:
        raise SystemExit(f"gate: duet eval failed (exit {rc})")
    res = json.loads(out.read_text())
    base = res["overall"]["avg@n"]
    lo, hi = s["gate"]["base_min"], s["gate"]["base_max"]
    result = {
        "settings_sha256": s["sha256"],
        "model": ctx["model"],
        "n": n,
        "base_avg@n": base,
        "base_pass@k": {k: v for k, v in res["overall"].items() if k.startswith("pass@")},
        "by_source": {src: m["avg@n"] for src, m in res["by_source"].items()},
        "in_range": lo <= base <= hi,
        "range": [lo, hi],
        "elapsed_s": time.perf_counter() - t0,
        "load_avg_before": load_before,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"gate: base held-out avg@{n} = {base:.3f} (must be in [{lo}, {hi}]): "
        f"{'PASS' if result['in_range'] else 'FAIL: change the task before any claim'}"
    )
    return result


def pilot_jobs(ctx: dict) -> list[tuple[str, dict]]:
    s, pl = ctx["settings"], ctx["settings"]["pilot"]
    jobs = []
    for i in range(max(len(pl["lr"]["2"]), len(pl["lr"]["16"]))):
        for g in (2, 16):  # interleaved, as the seeds
            if i < len(pl["lr"][str(g)]):
                lr = pl["lr"][str(g)][i]
                steps = steps_of(s, g, pl["epochs"])
                kw = dict(
                    phase="pilot",
                    g=g,
                    lr=lr,
                    seed=pl["seed"],
                    steps=steps,
                    eval_split="validation",
                    n_final=pl["n_validation"],
                    schedule=[],
                    n_curve=pl["n_validation"],
                )
                jobs.append((run_name("pilot", g, lr, pl["seed"]), kw))
    return jobs


def chosen_lrs(pilot_runs: list[dict]) -> dict[int, float]:
    """Per configuration, the pilot's learning rate with the best validation avg@n."""
    best: dict[int, dict] = {}
    for r in pilot_runs:
        if r["group_size"] not in best or r["final"]["avg@n"] > best[r["group_size"]]["final"]["avg@n"]:
            best[r["group_size"]] = r
    return {g: r["lr"] for g, r in best.items()}


def seed_jobs(ctx: dict, lrs: dict[int, float], seeds: list[int]) -> list[tuple[str, dict]]:
    s = ctx["settings"]
    jobs = []
    for seed in seeds:
        for g in (2, 16):
            kw = dict(
                phase="seed",
                g=g,
                lr=lrs[g],
                seed=seed,
                steps=steps_of(s, g),
                eval_split="held_out",
                n_final=s["evaluation"]["n_final"],
            )
            jobs.append((run_name("seed", g, lrs[g], seed), kw))
    return jobs


def smoke(ctx: dict) -> list[dict]:
    """One short run per configuration on the real task, model and protocol (128 rollouts per step),
    with a small evaluation: the per-step times the budget is sized from. Saved under smoke-*."""
    s = ctx["settings"]
    jobs = []
    for g, steps in ((2, ctx["args"].smoke_steps), (16, ctx["args"].smoke_steps)):
        kw = dict(
            phase="smoke",
            g=g,
            lr=s["pilot"]["lr"][str(g)][1],
            seed=0,
            steps=steps,
            eval_split="held_out",
            n_final=4,
            schedule=[],
            n_curve=4,
        )
        jobs.append((run_name("smoke", g, kw["lr"], 0), kw))
    return with_ray(ctx, jobs)


def plan(ctx: dict) -> dict:
    """The whole benchmark's time from the smoke runs' measured costs (per step, start-up, evaluation)."""
    s = ctx["settings"]
    smokes: dict[int, dict] = {}
    for path in sorted(ctx["runs_dir"].glob("smoke-*.json")):
        r = json.loads(path.read_text())
        smokes[r["group_size"]] = r
    if set(smokes) != {2, 16}:
        raise SystemExit("plan: run `smoke` first (it measures the step times)")
    held = s["task"]["held_out"]
    # An evaluation's cost per completion, from the smoke's evaluations (base + final, n = 4 each).
    per_completion = statistics.fmean(r["eval_s"] / (2 * 4 * held) for r in smokes.values())
    startup = statistics.fmean(r["startup_s"] for r in smokes.values())
    e, pl = s["evaluation"], s["pilot"]
    val = s["task"]["validation"]
    out: dict = {"measured": {}, "phases_s": {}}
    for g, r in smokes.items():
        out["measured"][f"{g}-GRPO s/step"] = r["step_s_median"]
    out["measured"]["start-up s/run"] = startup
    out["measured"]["eval s/completion"] = per_completion
    pilot_s = 0.0
    for g in (2, 16):
        step = out["measured"][f"{g}-GRPO s/step"]
        pilot_s += len(pl["lr"][str(g)]) * (
            steps_of(s, g, pl["epochs"]) * step + startup + 2 * pl["n_validation"] * val * per_completion
        )
    seed_s = 0.0
    for g in (2, 16):
        step, steps = out["measured"][f"{g}-GRPO s/step"], steps_of(s, g)
        evals = len(eval_steps(s, steps))  # includes the final one
        eval_completions = held * (e["n_curve"] * evals + e["n_final"])  # the base + the curve + the final
        seed_s += len(s["seeds"]) * (steps * step + startup + eval_completions * per_completion)
    out["phases_s"] = {
        "gate": held * e["n_final"] * per_completion + startup,
        "pilot": pilot_s,
        "seeds": seed_s,
    }
    out["total_min"] = sum(out["phases_s"].values()) / 60
    return out


# ---------------------------------------------------------------- the report


def report(
    ctx: dict, out_dir: Path, started: datetime, load_before: list[float], argv: list[str] | None
) -> dict:
    s = ctx["settings"]
    runs = [
        json.loads(p.read_text()) for p in sorted(ctx["runs_dir"].glob("*.json")) if p.name != "gate.json"
    ]
    mixed = sorted({r["settings_sha256"] for r in runs} - {s["sha256"]})
    if mixed:
        raise SystemExit(f"report: run files made under other settings ({mixed}) are in {ctx['runs_dir']}")
    pilot_runs = [r for r in runs if r["phase"] == "pilot"]
    seed_runs = [r for r in runs if r["phase"] == "seed"]
    gate_path = ctx["runs_dir"] / "gate.json"
    gate_result = json.loads(gate_path.read_text()) if gate_path.exists() else None
    groups: dict = {}
    for g in (2, 16):
        rs = sorted((r for r in seed_runs if r["group_size"] == g), key=lambda r: r["seed"])
        ks = sorted({k for r in rs for k in r["final"] if k.startswith("pass@")}, key=lambda k: int(k[5:]))
        groups[str(g)] = {
            "lr": sorted({r["lr"] for r in rs}),
            "seeds": [r["seed"] for r in rs],
            "final_avg@n": mean_ci([r["final"]["avg@n"] for r in rs]),
            "final_pass@k": {k: mean_ci([r["final"][k] for r in rs if k in r["final"]]) for k in ks},
            "base_avg@n": mean_ci([r["base"]["avg@n"] for r in rs]),
            "train_wall_s": mean_ci([r["train_wall_s"] for r in rs]),
            "startup_s": mean_ci([r["startup_s"] for r in rs]),
            "eval_s": mean_ci([r["eval_s"] for r in rs]),
            "rollouts": rs[0]["rollouts"] if rs else None,
            "steps": rs[0]["steps"] if rs else None,
            "load_avg_per_run": [r["load_avg"]["per_step_mean"] for r in rs],
            "time_split_mean_s": {k: statistics.fmean(r["time_split_s"][k] for r in rs) for k in SPLIT}
            if rs
            else None,
            "tie": tie_summary(rs, g),
            "runs": [{k: v for k, v in r.items() if k not in ("train_reward",)} for r in rs],
        }
    by_seed = {g: {r["seed"]: r for r in seed_runs if r["group_size"] == g} for g in (2, 16)}
    paired = sorted(set(by_seed[2]) & set(by_seed[16]))
    gaps = [100 * (by_seed[16][k]["final"]["avg@n"] - by_seed[2][k]["final"]["avg@n"]) for k in paired]
    gap = mean_ci(gaps)
    ratios = [by_seed[2][k]["train_wall_s"] / by_seed[16][k]["train_wall_s"] for k in paired]
    w2, w16 = groups["2"]["train_wall_s"]["mean"], groups["16"]["train_wall_s"]["mean"]
    equal_wall = [
        {
            "seed": k,
            "wall_s": by_seed[2][k]["train_wall_s"],
            "2-GRPO_final": by_seed[2][k]["curve"][-1]["avg@n"],
            "16-GRPO_at_that_wall_clock": interp(
                by_seed[16][k]["curve"], "wall_s", by_seed[2][k]["train_wall_s"]
            ),
        }
        for k in paired
    ]
    base16 = groups["16"]["base_avg@n"]["mean"]
    gain16 = (
        None
        if base16 is None or groups["16"]["final_avg@n"]["mean"] is None
        else (groups["16"]["final_avg@n"]["mean"] - (gate_result["base_avg@n"] if gate_result else base16))
    )
    g_cfg = s["gate"]
    gate_verdict = {
        "base_avg@n": gate_result["base_avg@n"] if gate_result else None,
        "base_in_range": gate_result["in_range"] if gate_result else None,
        "gain_16": gain16,
        "gain_16_enough": None if gain16 is None else gain16 >= g_cfg["min_gain_16"],
    }
    gate_verdict["valid"] = bool(gate_verdict["base_in_range"] and gate_verdict["gain_16_enough"])
    goal = s["goal"]
    results = {
        "benchmark": "group_size",
        "accuracy_gap": gap["mean"],
        "accuracy_gap_ci95": gap["ci95"],
        "accuracy_gap_per_seed": gaps,
        "time_ratio": None if None in (w2, w16) else w2 / w16,
        "time_ratio_per_seed": ratios,
        "rollout_ratio": None
        if None in (groups["2"]["rollouts"], groups["16"]["rollouts"])
        else groups["2"]["rollouts"] / groups["16"]["rollouts"],
        "seeds": paired,
        "lr_sweep": [
            {
                "group_size": r["group_size"],
                "lr": r["lr"],
                "validation_avg@n": r["final"]["avg@n"],
                "n": r["final"]["n"],
                "steps": r["steps"],
                "train_wall_s": r["train_wall_s"],
            }
            for r in sorted(pilot_runs, key=lambda r: (r["group_size"], r["lr"]))
        ],
        "chosen_lr": {str(g): lr for g, lr in chosen_lrs(pilot_runs).items()},
        "gate": gate_verdict,
        "equal_wall_clock": equal_wall,
        "goal": goal,
        "groups": groups,
        "settings": {k: v for k, v in s.items()},
        **provenance("group_size.py", argv, started, load_before),
    }
    if gap["mean"] is not None and results["time_ratio"] is not None:
        results["goal"] = dict(
            goal,
            met=gap["mean"] <= goal["accuracy_gap_max_points"]
            and results["time_ratio"] <= goal["time_ratio_max"],
            interval_narrow_enough=gap["ci95"] is not None and gap["ci95"] <= goal["gap_interval_max_points"],
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "group_size.json").write_text(json.dumps(results, indent=1) + "\n")
    if paired:
        plot(results, out_dir / "group_size.png")
    return results


def tie_summary(rs: list[dict], g: int) -> dict:
    """Measured tied-group fraction (first and last tenth of training) against p^G + (1 − p)^G over
    the held-out problems, from the base evaluation of the gate and the final n_final evaluation."""
    if not rs:
        return {}
    tenth = max(1, len(rs[0]["tied_fraction"]) // 10)
    return {
        "measured_first_tenth": statistics.fmean(statistics.fmean(r["tied_fraction"][:tenth]) for r in rs),
        "measured_last_tenth": statistics.fmean(statistics.fmean(r["tied_fraction"][-tenth:]) for r in rs),
        "predicted_at_end": statistics.fmean(
            x for r in rs if (x := tie_prediction(r["final_histogram"] or [0], g)) is not None
        )
        if any(r["final_histogram"] for r in rs)
        else None,
        "note": "prediction from the held-out problems' per-problem accuracy (same distribution as training); "
        "measured over training batches, with temperature 1.0 (the evaluation samples at 0.7)",
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = {"2": "tab:blue", "16": "tab:orange"}
    for g, group in results["groups"].items():
        for i, run in enumerate(group["runs"]):
            curve = [p for p in run["curve"] if p["n"] == run["curve"][0]["n"]]
            label = f"{g}-GRPO (lr {run['lr']:g})" if i == 0 else None
            for ax, x in zip(axes, ("rollouts", "wall_s")):
                ax.plot(
                    [p[x] for p in curve],
                    [p["avg@n"] for p in curve],
                    color=colors[g],
                    alpha=0.6,
                    label=label,
                )
                ax.plot(run["curve"][-1][x], run["curve"][-1]["avg@n"], "*", color=colors[g], markersize=10)
            tied = run["tied_fraction"]
            axes[2].plot(range(1, len(tied) + 1), tied, color=colors[g], alpha=0.25, label=label)
        tie = group["tie"]
        if tie.get("predicted_at_end") is not None:
            axes[2].axhline(
                tie["predicted_at_end"], color=colors[g], ls="--", label=f"{g}: p^G+(1-p)^G at end"
            )
    axes[0].set_xlabel("rollouts generated")
    axes[1].set_xlabel("training wall-clock (s; start-up and evaluation excluded)")
    axes[2].set_xlabel("optimizer step")
    axes[2].set_ylabel("tied-group fraction")
    axes[2].set_xscale("log")
    axes[0].set_ylabel("held-out avg@n (★ final, n_final)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ci = results["accuracy_gap_ci95"]
    fig.suptitle(
        f"2-GRPO vs 16-GRPO, seeds {results['seeds']}: accuracy gap {results['accuracy_gap']:+.2f} pts"
        + (f" (±{ci:.2f})" if ci is not None else "")
        + f", time ratio {results['time_ratio']:.2f}, rollout ratio {results['rollout_ratio']:.3f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["all", "gate", "pilot", "seeds", "report", "smoke", "plan"])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--model-cache", default="~/.cache/duet-rl")
    ap.add_argument("--runs-dir", default=str(RESULTS / "group_size_runs"))
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument(
        "--seeds", type=int, default=None, help="evaluation seeds (default: the config's; <= max_seeds)"
    )
    ap.add_argument("--smoke-steps", type=int, default=12)
    args = ap.parse_args(argv)
    started, load_before = datetime.now(timezone.utc), [round(x, 2) for x in os.getloadavg()]
    ctx = prepare(args)
    s = ctx["settings"]
    if args.phase == "smoke":
        ctx["runs_dir"] = Path(args.runs_dir) / "smoke"
        ctx["runs_dir"].mkdir(parents=True, exist_ok=True)
        smoke(ctx)
        print(json.dumps(plan(ctx), indent=1))
        return 0
    if args.phase == "plan":
        ctx["runs_dir"] = Path(args.runs_dir) / "smoke"
        print(json.dumps(plan(ctx), indent=1))
        return 0
    if args.phase in ("gate", "all"):
        g = gate(ctx)
        if not g["in_range"]:
            return 3
    if args.phase in ("pilot", "all"):
        pilot_runs = with_ray(ctx, pilot_jobs(ctx))
        if len(pilot_runs) < len(pilot_jobs(ctx)):
            print("pilot: not every run finished; run it again (finished runs are skipped)")
            return 1
    if args.phase in ("seeds", "all"):
        pilot_runs = [r for name, _ in pilot_jobs(ctx) if (r := finished(ctx, name)) is not None]
        if len(pilot_runs) < len(pilot_jobs(ctx)):
            raise SystemExit("seeds: the pilot has not finished (run `pilot` first)")
        n = args.seeds or len(s["seeds"])
        if n > s["max_seeds"]:
            raise SystemExit(f"--seeds {n}: at most max_seeds={s['max_seeds']}")
        seeds = list(range(n)) if args.seeds else s["seeds"]
        lrs = chosen_lrs(pilot_runs)
        print(f"seeds {seeds} at the pilot's learning rates {lrs}", flush=True)
        runs = with_ray(ctx, seed_jobs(ctx, lrs, seeds))
        if len(runs) < 2 * len(seeds):
            print("seeds: not every run finished; run it again (finished runs are skipped)")
            return 1
    if args.phase in ("report", "all", "seeds"):
        res = report(ctx, Path(args.out_dir), started, load_before, argv)
        keys = (
            "accuracy_gap",
            "accuracy_gap_ci95",
            "time_ratio",
            "rollout_ratio",
            "seeds",
            "chosen_lr",
            "gate",
        )
        print(json.dumps({k: res[k] for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

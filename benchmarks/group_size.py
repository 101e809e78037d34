"""The paper's claim in a miniature that can hold it: does 2-GRPO reach 16-GRPO's plateau, and does
pair-aware sampling close the gap? (issues 14 and 23)

    python benchmarks/group_size.py all      # gate → pilot → seeds → report; resumable, run by run
    python benchmarks/group_size.py gate     # the validity gate's first half: the base policy's accuracy
    python benchmarks/group_size.py pilot    # 2 epochs, every learning rate of every arm's grid (bracketed)
    python benchmarks/group_size.py seeds [--seeds N]   # the evaluation seeds at each arm's pilot choice
    python benchmarks/group_size.py report   # aggregate the run files → group_size.{json,png}
    python benchmarks/group_size.py smoke    # one short run per arm (step times), under --runs-dir/smoke
    python benchmarks/group_size.py plan     # the time the runs not yet finished need, from the smoke's
    common options: [--config benchmarks/group_size.yaml] [--model-cache DIR] [--runs-dir DIR] [--arms A,B]

Everything that defines the experiment (task, splits, warm start, protocol, evaluation schedule, the
arms with their learning-rate grids, seeds, gate and goal) is in benchmarks/group_size.yaml. Every run
file records the key of what defines it (`settings_key`: the shared sections and its own arm, not the
arm's grid); the report refuses a run made under another key, and a finished run is never redone, so an
arm added later reuses every other arm's runs.

Task (benchmarks/arithmetic_task.py): two-digit addition and subtraction, four disjoint splits
(held-out 512, validation 512, RL training 2048, warm start 4096; a+b and b+a in the same split).
Base policy: the embedded tiny Llama's architecture and tokenizer, trained supervised on the warm-start
split only. Answers are checked by the project's math verifier (rewards.verifier=math).

Arms: 16-GRPO (P prompts × 16 per step) and 2-GRPO (8P × 2: the same 16·P first-round rollouts per step),
plain, with refill (fresh prompts for dropped pairs, the paper's +RS) and with pair-aware sampling
(`algorithm.extend_tied_to` 4 and 8: tied pairs get more rollouts, the learner one disagreeing pair). All
run E epochs over the same 2048 problems (with refill, epochs count prompts drawn, so fewer steps),
presets `16-grpo` / `2-grpo` (clip 0.2/0.28, tied groups dropped), temperature 1.0.
Learning rates: the pilot runs every rate of an arm's grid (pilot.epochs, seed pilot.seed) and takes the
best by validation-split avg@n; while that best is at the edge of the rates run, it runs the rate a
pilot.bracket_factor beyond it (at most pilot.max_bracket_extensions times). The seeds run at each arm's
choice, interleaved (every arm's seed s, then seed s + 1, ...) so machine load hits all alike; every
run records the 1-minute load average at every step.

Timing: training wall-clock = the sum of the driver's time/step_s (generate, extension, reward wait,
train, broadcast, bookkeeping); engine/learner start-up and the evaluations (run from the step callback,
between steps) are timed apart and excluded. Evaluations: avg@n_curve on the held-out set at the same
step numbers for every arm (every every_steps_early steps up to 2-GRPO's last step, every
every_steps_late after), and avg@n_final / pass@k at the last step.

Resumable: one JSON file per run in --runs-dir (default benchmarks/results/group_size_runs/); a run
whose file exists is skipped, so an interrupted benchmark goes on where it stopped.

Report (benchmarks/results/group_size.{json,png}): per arm (`arms.<name>`) the final held-out
avg@n_final and pass@k, mean and 95% t-interval over seeds; the gap to 16-GRPO (points, paired by seed)
with its interval; time and rollout ratios to 16-GRPO; the tied fraction over training and rollouts per
signal group; its pilot grid and choice. `best_pair_arm`: the 2-rollout arm that meets the goal with the
smallest gap (else the smallest gap). The top-level keys of issue 14 (accuracy_gap, time_ratio, groups
...) stay, for plain 2-GRPO against 16-GRPO. The PNG: held-out curves at equal rollouts and at equal
wall-clock, the tied fraction per step, and the final accuracy per arm.
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


REFERENCE, PLAIN = "16-GRPO", "2-GRPO"  # the arms every other is compared with; the old top-level keys
ARM_FIELDS = {"group_size", "lr", "refill", "max_refill_rounds", "extend_tied_to"}


def load_settings(path: Path) -> dict:
    """The committed settings, checked against what issues 14 and 23 ask of the experiment."""
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
    arms = s.get("arms") or {}
    for name in (REFERENCE, PLAIN):
        if arms.get(name, {}).get("group_size") != int(name.split("-")[0]):
            problems.append(f"arms.{name}: missing, or not group_size {name.split('-')[0]}")
    for name, arm in arms.items():
        if set(arm) - ARM_FIELDS:
            problems.append(f"arms.{name}: unknown fields {sorted(set(arm) - ARM_FIELDS)}")
        elif arm.get("group_size") not in (2, 16):
            problems.append(f"arms.{name}.group_size: 2 or 16")
        elif len(arm.get("lr", [])) < 3:
            problems.append(f"arms.{name}.lr: fewer than 3 learning rates")
        else:
            from cluster.config import load_config

            try:  # the arm's algorithm fields, as the run will load them
                load_config(preset=f"{arm['group_size']}-grpo", overrides=arm_overrides(arm))
            except ValueError as e:
                problems.append(f"arms.{name}: {e}")
    if len({arm_slug(arm) for arm in arms.values()}) < len(arms):
        problems.append("arms: two arms with the same settings")
    if s["pilot"].get("bracket_factor", 0) <= 1:
        problems.append("pilot.bracket_factor: must be > 1")
    if len(s["seeds"]) < 5:
        problems.append("seeds: fewer than 5")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return s


def arm_overrides(arm: dict) -> list[str]:
    """The config overrides that make an arm out of its preset (`{group_size}-grpo`)."""
    out = []
    if arm.get("refill"):
        out += ["algorithm.refill=true", f"algorithm.max_refill_rounds={arm.get('max_refill_rounds', 4)}"]
    if arm.get("extend_tied_to"):
        out.append(f"algorithm.extend_tied_to={arm['extend_tied_to']}")
    return out


def arm_slug(arm: dict) -> str:
    """The arm's part of its run files' names: g2, g16 (issue 14's names), g2-refill, g2-ext8 ..."""
    slug = f"g{arm['group_size']}"
    if arm.get("refill"):
        slug += "-refill" + (f"{arm['max_refill_rounds']}" if arm.get("max_refill_rounds", 4) != 4 else "")
    if arm.get("extend_tied_to"):
        slug += f"-ext{arm['extend_tied_to']}"
    return slug


def settings_key(s: dict, arm: dict | None = None) -> str:
    """What a run's outcome depends on, hashed: the shared sections (task, warm start, protocol,
    evaluation, the pilot's epochs, seed and n_validation) and, for a run of an arm, the arm without its
    learning-rate grid (the run's own rate is in its name and its file). The gate's key has no arm."""
    pilot = {k: s["pilot"][k] for k in ("epochs", "seed", "n_validation")}
    what = {k: s[k] for k in ("task", "warm_start", "protocol", "evaluation")} | {"pilot": pilot}
    if arm is not None:
        what["arm"] = {k: v for k, v in arm.items() if k != "lr"}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def prompts_of(s: dict, g: int) -> int:
    p16 = s["protocol"]["prompts_per_step_16"]
    return p16 if g == 16 else 8 * p16


def steps_of(s: dict, g: int, epochs: int | None = None) -> int:
    """Optimizer steps of E epochs at one batch of prompts per step (an arm with refill makes fewer)."""
    return (epochs or s["protocol"]["epochs"]) * s["task"]["train"] // prompts_of(s, g)


def eval_steps(s: dict, total_steps: int) -> list[int]:
    """The steps after which the held-out curve is measured: the same numbers for every arm (dense while
    2-GRPO runs, sparse after), and the last step."""
    e = s["evaluation"]
    horizon = steps_of(s, 2)
    early = range(e["every_steps_early"], min(horizon, total_steps) + 1, e["every_steps_early"])
    late = range(e["every_steps_late"], total_steps + 1, e["every_steps_late"])
    return sorted({*early, *(x for x in late if x > horizon), total_steps})


def run_name(phase: str, slug: str, lr: float, seed: int) -> str:
    return f"{phase}-{slug}-lr{lr:g}-seed{seed}"


def bracket_next(scores: dict[float, float], factor: float) -> float | None:
    """The rate to try next so that the best of `scores` (rate -> validation avg@n) is not at the edge of
    the rates run: `factor` below the lowest when that is the best, above the highest when that is;
    None when the best is inside. On a tie for best the lower rate counts."""
    lrs = sorted(scores)
    best = max(lrs, key=lambda lr: (scores[lr], -lr))
    if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
        return None
    return float(f"{best / factor if best == lrs[0] else best * factor:.3g}")


def pilot_grid(s: dict, arm: dict, scores: dict[float, float]) -> tuple[list[float], bool]:
    """An arm's grid as the pilot runs it: the declared rates, then the bracket's extensions in turn
    while their results exist. Returns (the rates to run so far, whether the grid is complete: every rate
    run, and the best inside the grid or the extensions used up)."""
    grid = [float(x) for x in arm["lr"]]
    pl = s["pilot"]
    for _ in range(pl.get("max_bracket_extensions", 0) + 1):
        if any(lr not in scores for lr in grid):
            return grid, False
        nxt = bracket_next({lr: scores[lr] for lr in grid}, pl["bracket_factor"])
        if nxt is None or len(grid) - len(arm["lr"]) >= pl.get("max_bracket_extensions", 0):
            return grid, True
        grid.append(nxt)
    return grid, False


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
    rollouts, the tied-group fraction, the groups that carried a gradient and the load average at every
    step. The run ends after the step at which `prompt_budget` prompts have been drawn (E epochs; with
    refill that comes before train.steps) or at train.steps."""

    def __init__(self, schedule: list[int], n_curve: int, n_final: int, prompt_budget: int) -> None:
        self.schedule, self.n_curve, self.n_final = set(schedule), n_curve, n_final
        self.prompt_budget = prompt_budget
        self.prompts_drawn = 0
        self.curve: list[dict] = []
        self.final: dict = {}
        self.train_reward: list[float] = []
        self.tied: list[float] = []
        self.signal_groups: list[int] = []
        self.extension = dict.fromkeys(("groups_extended", "groups_tied_at_cap", "rollouts_extension"), 0)
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
        self.signal_groups.append(m["groups/with_signal"])
        for key in self.extension:
            self.extension[key] += m[key.replace("_", "/", 1)]
        self.load.append(round(os.getloadavg()[0], 2))
        parts = {name: m.get(key, 0.0) for name, key in SPLIT.items()}
        parts["other"] = m["time/step_s"] - sum(parts.values())
        for name, v in parts.items():
            self.split[name] += v
        position = trainer.prompts.state()
        self.prompts_drawn = position["epoch"] * len(trainer.prompts.prompts) + position["offset"]
        if trainer.step == trainer.cfg.train.steps or self.prompts_drawn >= self.prompt_budget:
            trainer.cfg.train.steps = trainer.step  # the driver's loop ends after this step
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
    arm: dict,
    lr: float,
    seed: int,
    steps: int,
    eval_file: Path,
    run_dir: Path,
    n_curve: int,
):
    from cluster.config import load_config

    p, g = s["protocol"], arm["group_size"]
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
        *arm_overrides(arm),
    ]
    return load_config(overrides=overrides, preset=f"{g}-grpo")


def one_run(
    ctx: dict,
    phase: str,
    arm: str,
    lr: float,
    seed: int,
    epochs: int,
    eval_split: str,
    n_final: int,
    schedule: list[int] | None = None,
    n_curve: int | None = None,
    steps: int | None = None,
) -> dict:
    """One training run of `arm` at `lr` for `epochs` epochs (or `steps`, the smoke's), with its
    evaluations; returns its record (what the run file holds)."""
    from cluster.driver import Trainer

    s = ctx["settings"]
    a = s["arms"][arm]
    g = a["group_size"]
    n_curve = n_curve or s["evaluation"]["n_curve"]
    run_dir = ctx["scratch"] / run_name(phase, arm_slug(a), lr, seed)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted before its result file: start it over
    run_dir.mkdir(parents=True)
    # At most one batch of prompts per step: E epochs take this many steps, fewer with refill.
    steps = steps or steps_of(s, g, epochs)
    budget = epochs * s["task"]["train"] if phase != "smoke" else steps * prompts_of(s, g)
    cfg = run_config(
        s, ctx["files"], ctx["model"], a, lr, seed, steps, ctx["files"][eval_split], run_dir, n_curve
    )
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    rec = Recorder(eval_steps(s, steps) if schedule is None else schedule, n_curve, n_final, budget)
    Trainer(cfg, run_dir).run(on_step=rec)
    return {
        "phase": phase,
        "arm": arm,
        "group_size": g,
        "seed": seed,
        "lr": lr,
        "settings_key": settings_key(s, a),
        "settings_sha256": s["sha256"],
        "eval_split": eval_split,
        "prompts_per_step": cfg.rollout.prompts_per_step,
        "steps": len(rec.step_s),
        "prompts_drawn": rec.prompts_drawn,
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
        "extension": rec.extension,
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
        "signal_groups": rec.signal_groups,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- phases


def prepare(args: argparse.Namespace) -> dict:
    """Settings, the split files and the warm-started model (built once, cached; not for `report` and
    `plan`, which read run files only)."""
    s = load_settings(Path(args.config))
    t = s["task"]
    splits = split_problems(
        t["max_operand"],
        {k: t[k] for k in ("held_out", "validation", "train", "warm_start")},
        t["split_seed"],
    )
    data_dir = Path(os.path.expanduser(args.model_cache)) / f"group-size-task-{settings_key(s)[:12]}"
    files = write_splits(splits, data_dir)
    w = s["warm_start"]
    t0 = time.perf_counter()
    model = None
    if args.phase not in ("report", "plan"):
        model = ensure_warm_model(
            args.model_cache, splits["warm_start"], w["steps"], w["lr"], w["batch"], w["seed"]
        )
        print(
            f"task files in {data_dir}; warm-started model {model} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    arms = list(s["arms"]) if not args.arms else args.arms.split(",")
    if unknown := set(arms) - set(s["arms"]):
        raise SystemExit(f"--arms: no arm {sorted(unknown)} in {args.config} (arms: {list(s['arms'])})")
    return {
        "settings": s,
        "files": files,
        "model": str(model),
        "runs_dir": runs_dir,
        "args": args,
        "arms": arms,
    }


def result_path(ctx: dict, name: str) -> Path:
    return ctx["runs_dir"] / f"{name}.json"


def stale_runs(s: dict, runs: list[dict]) -> list[str]:
    """Runs that belong to no current arm, or were made under another key than their arm's now."""
    keys = {name: settings_key(s, arm) for name, arm in s["arms"].items()}
    return [
        f"{r.get('phase')}-{r.get('arm')}-lr{r.get('lr')}-seed{r.get('seed')} (arm {r.get('arm')!r}, key "
        f"{str(r.get('settings_key'))[:12]}, now {keys[r['arm']][:12] if r.get('arm') in keys else 'no such arm'})"
        for r in runs
        if keys.get(r.get("arm")) != r.get("settings_key")
    ]


def finished(ctx: dict, name: str) -> dict | None:
    path = result_path(ctx, name)
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    if run["phase"] == "smoke":  # a measurement of step times, not a result: any settings' will do
        return run
    if stale := stale_runs(ctx["settings"], [run]):
        raise SystemExit(
            f"{path} was made under other settings: {stale[0]}. Move it away before running again"
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
                    f"(base {run['base']['avg@n']:.3f}), {run['steps']} steps, {run['rollouts']} rollouts, "
                    f"train {run['train_wall_s']:.1f} s ({run['train_wall_s'] / max(run['steps'], 1):.3f} s/step), "
                    f"start-up {run['startup_s']:.0f} s, eval {run['eval_s']:.0f} s, "
                    f"load {run['load_avg']['per_step_mean']:.1f} [{time.perf_counter() - t0:.0f} s]",
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
    key = settings_key(ctx["settings"])
    if path.exists():
        g = json.loads(path.read_text())
        if g.get("settings_key") == key:
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
        "settings_key": key,
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


def pilot_job(s: dict, arm: str, lr: float) -> tuple[str, dict]:
    pl = s["pilot"]
    kw = dict(
        phase="pilot",
        arm=arm,
        lr=lr,
        seed=pl["seed"],
        epochs=pl["epochs"],
        eval_split="validation",
        n_final=pl["n_validation"],
        schedule=[],
        n_curve=pl["n_validation"],
    )
    return run_name("pilot", arm_slug(s["arms"][arm]), lr, pl["seed"]), kw


def pilot_scores(ctx: dict, arm: str, lrs: list[float]) -> dict[float, float]:
    """Validation avg@n of the arm's finished pilot runs among `lrs`."""
    s = ctx["settings"]
    out = {}
    for lr in lrs:
        run = finished(ctx, pilot_job(s, arm, lr)[0])
        if run is not None:
            out[lr] = run["final"]["avg@n"]
    return out


def pilot_state(ctx: dict) -> dict[str, tuple[list[float], bool]]:
    """Per arm of this invocation: (its grid so far, whether its pilot is complete); see `pilot_grid`."""
    s, out = ctx["settings"], {}
    for arm in ctx["arms"]:
        a, extra = s["arms"][arm], []
        # the rates the bracket may add: found among the finished runs by walking the grid forward
        grid, done = pilot_grid(s, a, pilot_scores(ctx, arm, [float(x) for x in a["lr"]]))
        while not done and set(grid) != set(extra):
            extra = grid
            grid, done = pilot_grid(s, a, pilot_scores(ctx, arm, grid))
        out[arm] = (grid, done)
    return out


def pilot(ctx: dict) -> bool:
    """Every arm's grid, interleaved by position (as the seeds), then the bracket's extensions, until every
    arm's grid is complete. Returns whether it is (False: a run failed; run it again)."""
    s = ctx["settings"]
    while True:
        state = pilot_state(ctx)
        jobs, width = [], max(len(grid) for grid, _ in state.values())
        for i in range(width):
            for arm, (grid, _) in state.items():
                if i < len(grid):
                    jobs.append(pilot_job(s, arm, grid[i]))
        before = sum(finished(ctx, name) is not None for name, _ in jobs)
        runs = with_ray(ctx, jobs)
        if len(runs) < len(jobs):
            return False
        if all(done for _, done in pilot_state(ctx).values()):
            return True
        if len(runs) == before and pilot_state(ctx) == state:  # nothing new ran and nothing changed
            return False


def chosen_lrs(pilot_runs: list[dict], key: str = "arm") -> dict:
    """Per arm (or per `key`), the pilot's learning rate with the best validation avg@n (the lower
    rate on a tie)."""
    best: dict = {}
    for r in sorted(pilot_runs, key=lambda r: r["lr"]):
        if r[key] not in best or r["final"]["avg@n"] > best[r[key]]["final"]["avg@n"]:
            best[r[key]] = r
    return {k: r["lr"] for k, r in best.items()}


def seed_jobs(ctx: dict, lrs: dict[str, float], seeds: list[int]) -> list[tuple[str, dict]]:
    s = ctx["settings"]
    jobs = []
    for seed in seeds:
        for arm in (a for a in ctx["arms"] if a in lrs):
            kw = dict(
                phase="seed",
                arm=arm,
                lr=lrs[arm],
                seed=seed,
                epochs=s["protocol"]["epochs"],
                eval_split="held_out",
                n_final=s["evaluation"]["n_final"],
            )
            jobs.append((run_name("seed", arm_slug(s["arms"][arm]), lrs[arm], seed), kw))
    return jobs


def smoke_lr(arm: dict) -> float:
    """The smoke's rate: the middle of the declared grid (issue 14's smoke files for g2 and g16)."""
    return float(sorted(arm["lr"])[len(arm["lr"]) // 2])


def smoke(ctx: dict) -> list[dict]:
    """One short run per arm on the real task, model and protocol (the first rounds' 128 rollouts per
    step), with a small evaluation: the per-step times the budget is sized from. Saved under smoke/."""
    s = ctx["settings"]
    jobs = []
    for arm in ctx["arms"]:
        a = s["arms"][arm]
        kw = dict(
            phase="smoke",
            arm=arm,
            lr=smoke_lr(a),
            seed=0,
            epochs=s["protocol"]["epochs"],
            steps=ctx["args"].smoke_steps,
            eval_split="held_out",
            n_final=4,
            schedule=[],
            n_curve=4,
        )
        jobs.append((run_name("smoke", arm_slug(a), kw["lr"], 0), kw))
    return with_ray(ctx, jobs)


def plan(ctx: dict, smoke_dir: Path) -> dict:
    """The time the runs not yet finished need, from the smoke runs' measured costs per arm (per step,
    prompts drawn per step, start-up, evaluation). Arms whose pilot is not complete are counted with their
    declared grid and five seed runs; each bracket extension adds one pilot run (`pilot_run_s`)."""
    s = ctx["settings"]
    smokes: dict[str, dict] = {}
    for arm in ctx["arms"]:  # by name: issue 14's smoke files have no arm field
        path = smoke_dir / f"{run_name('smoke', arm_slug(s['arms'][arm]), smoke_lr(s['arms'][arm]), 0)}.json"
        if path.exists():
            smokes[arm] = json.loads(path.read_text())
    if missing := [a for a in ctx["arms"] if a not in smokes]:
        raise SystemExit(f"plan: no smoke run of {missing}: run `smoke` first (it measures the step times)")
    held, val = s["task"]["held_out"], s["task"]["validation"]
    e, pl = s["evaluation"], s["pilot"]
    # An evaluation's cost per completion, from the smoke's evaluations (base + final, n = 4 each).
    per_completion = statistics.fmean(r["eval_s"] / (2 * 4 * held) for r in smokes.values())
    startup = statistics.fmean(r["startup_s"] for r in smokes.values())
    state = pilot_state(ctx)
    out: dict = {"measured": {"start-up s/run": startup, "eval s/completion": per_completion}, "arms": {}}
    total = 0.0
    for arm in ctx["arms"]:
        r = smokes[arm]
        step = r["step_s_median"]
        drawn = r.get("prompts_drawn", r["steps"] * r["prompts_per_step"]) / r["steps"]
        pilot_steps = math.ceil(pl["epochs"] * s["task"]["train"] / drawn)
        steps = math.ceil(s["protocol"]["epochs"] * s["task"]["train"] / drawn)
        pilot_run = pilot_steps * step + startup + 2 * pl["n_validation"] * val * per_completion
        evals = held * (e["n_curve"] * len(eval_steps(s, steps)) + e["n_final"])  # base + curve + final
        seed_run = steps * step + startup + evals * per_completion
        grid, done = state[arm]
        pilot_todo = sum(finished(ctx, pilot_job(s, arm, lr)[0]) is None for lr in grid)
        seeds_todo = len(s["seeds"])
        if done:
            lr = chosen_lrs([finished(ctx, pilot_job(s, arm, lr)[0]) for lr in grid])[arm]
            seeds_todo = sum(finished(ctx, name) is None for name, _ in seed_jobs(ctx, {arm: lr}, s["seeds"]))
        out["arms"][arm] = {
            "s/step": step,
            "prompts drawn/step": drawn,
            "steps/seed run": steps,
            "pilot_run_s": pilot_run,
            "seed_run_s": seed_run,
            "pilot runs to do": pilot_todo,
            "seed runs to do": seeds_todo,
        }
        total += pilot_todo * pilot_run + seeds_todo * seed_run
    gate_done = (ctx["runs_dir"] / "gate.json").exists()
    total += 0 if gate_done else held * e["n_final"] * per_completion + startup
    out["total_min"] = total / 60
    return out


# ---------------------------------------------------------------- the report


def signal_groups(run: dict) -> list[float]:
    """Groups that carried a gradient, per step. Issue 14's runs (no extension, no refill) did not record
    it: there it is the step's prompts less its tied ones."""
    if "signal_groups" in run:
        return run["signal_groups"]
    return [run["prompts_per_step"] * (1.0 - t) for t in run["tied_fraction"]]


def arm_summary(s: dict, name: str, pilot_runs: list[dict], seed_runs: list[dict]) -> dict:
    """One arm: its pilot (grid as run, the choice, whether bracketed) and its seeds at that choice."""
    arm = s["arms"][name]
    scores = {r["lr"]: r["final"]["avg@n"] for r in pilot_runs}
    grid, complete = pilot_grid(s, arm, scores)
    ran = {lr: scores[lr] for lr in grid if lr in scores}
    lr = chosen_lrs([r for r in pilot_runs if r["lr"] in ran])[name] if ran else None
    rs = sorted((r for r in seed_runs if r["lr"] == lr), key=lambda r: r["seed"])
    ks = sorted({k for r in rs for k in r["final"] if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    rollouts = [r["rollouts"] for r in rs]
    signal = [sum(signal_groups(r)) for r in rs]
    tied = [statistics.fmean(r["tied_fraction"]) for r in rs]
    return {
        "group_size": arm["group_size"],
        "settings": {k: v for k, v in arm.items() if k != "lr"},
        "lr_grid": sorted(grid),
        "validation_avg@n": {f"{x:g}": v for x, v in sorted(ran.items())},
        "lr": lr,
        "pilot_complete": complete,
        "bracketed": bool(ran) and complete and bracket_next(ran, s["pilot"]["bracket_factor"]) is None,
        "seeds": [r["seed"] for r in rs],
        "final_avg@n": mean_ci([r["final"]["avg@n"] for r in rs]),
        "final_pass@k": {k: mean_ci([r["final"][k] for r in rs if k in r["final"]]) for k in ks},
        "base_avg@n": mean_ci([r["base"]["avg@n"] for r in rs]),
        "train_wall_s": mean_ci([r["train_wall_s"] for r in rs]),
        "steps": mean_ci([r["steps"] for r in rs]),
        "rollouts": mean_ci(rollouts),
        "tied_fraction": mean_ci(tied),  # the first round's, mean over training steps
        "rollouts_per_signal_group": mean_ci([r / g for r, g in zip(rollouts, signal) if g]),
        "extension": {
            k: mean_ci([r["extension"][k] for r in rs if "extension" in r])
            for k in ("groups_extended", "groups_tied_at_cap", "rollouts_extension")
        },
        "load_avg_per_run": [r["load_avg"]["per_step_mean"] for r in rs],
        "time_split_mean_s": {k: statistics.fmean(r["time_split_s"][k] for r in rs) for k in SPLIT}
        if rs
        else None,
        "tie": tie_summary(rs, arm["group_size"]),
        "runs": [{k: v for k, v in r.items() if k not in ("train_reward",)} for r in rs],
    }


def compare(arm: dict, ref: dict) -> dict:
    """An arm against 16-GRPO, paired by seed: the gap (points, 16-GRPO − arm), time and rollout ratios,
    and the reference's accuracy when the arm's training ended (equal wall-clock)."""
    mine = {r["seed"]: r for r in arm["runs"]}
    theirs = {r["seed"]: r for r in ref["runs"]}
    paired = sorted(set(mine) & set(theirs))
    gaps = [100 * (theirs[k]["final"]["avg@n"] - mine[k]["final"]["avg@n"]) for k in paired]
    gap = mean_ci(gaps)
    time_ratio = [mine[k]["train_wall_s"] / theirs[k]["train_wall_s"] for k in paired]
    rollout_ratio = [mine[k]["rollouts"] / theirs[k]["rollouts"] for k in paired]
    return {
        "paired_seeds": paired,
        "gap": gap["mean"],
        "gap_ci95": gap["ci95"],
        "gap_per_seed": gaps,
        "time_ratio": statistics.fmean(time_ratio) if paired else None,
        "time_ratio_per_seed": time_ratio,
        "rollout_ratio": statistics.fmean(rollout_ratio) if paired else None,
        "equal_wall_clock": [
            {
                "seed": k,
                "wall_s": mine[k]["train_wall_s"],
                "arm_final": mine[k]["curve"][-1]["avg@n"],
                "16-GRPO_at_that_wall_clock": interp(theirs[k]["curve"], "wall_s", mine[k]["train_wall_s"]),
            }
            for k in paired
        ],
    }


def best_pair(arms: dict, goal: dict) -> str | None:
    """The 2-rollout arm that meets the goal (gap and time ratio) with the smallest gap; if none does,
    the one with the smallest gap."""
    pairs = {n: a for n, a in arms.items() if a["group_size"] == 2 and a.get("gap") is not None}
    if not pairs:
        return None
    meets = {
        n: a
        for n, a in pairs.items()
        if a["gap"] <= goal["accuracy_gap_max_points"] and a["time_ratio"] <= goal["time_ratio_max"]
    }
    return min(meets or pairs, key=lambda n: (meets or pairs)[n]["gap"])


def report(
    ctx: dict, out_dir: Path, started: datetime, load_before: list[float], argv: list[str] | None
) -> dict:
    s = ctx["settings"]
    runs = [
        json.loads(p.read_text()) for p in sorted(ctx["runs_dir"].glob("*.json")) if p.name != "gate.json"
    ]
    if stale := stale_runs(s, runs):
        raise SystemExit(
            f"report: run files made under other settings are in {ctx['runs_dir']}: {'; '.join(stale)}"
        )
    gate_path = ctx["runs_dir"] / "gate.json"
    gate_result = json.loads(gate_path.read_text()) if gate_path.exists() else None
    if gate_result is not None and gate_result.get("settings_key") != settings_key(s):
        raise SystemExit(f"report: {gate_path} was made under other settings: run `gate` again")
    arms: dict = {}
    for name in s["arms"]:
        mine = [r for r in runs if r["arm"] == name]
        arms[name] = arm_summary(
            s, name, [r for r in mine if r["phase"] == "pilot"], [r for r in mine if r["phase"] == "seed"]
        )
    for name, arm in arms.items():
        arm.update(compare(arm, arms[REFERENCE]) if name != REFERENCE else {})
    goal = s["goal"]
    best = best_pair(arms, goal)
    plain, ref = arms[PLAIN], arms[REFERENCE]
    plain_vs_ref = compare(plain, ref)
    # issue 14's keys, for plain 2-GRPO against 16-GRPO
    groups = {}
    for g, a in (("2", plain), ("16", ref)):
        rs = a["runs"]
        groups[g] = {
            "lr": [a["lr"]] if a["lr"] is not None else [],
            "seeds": a["seeds"],
            "final_avg@n": a["final_avg@n"],
            "final_pass@k": a["final_pass@k"],
            "base_avg@n": a["base_avg@n"],
            "train_wall_s": a["train_wall_s"],
            "startup_s": mean_ci([r["startup_s"] for r in rs]),
            "eval_s": mean_ci([r["eval_s"] for r in rs]),
            "rollouts": rs[0]["rollouts"] if rs else None,
            "steps": rs[0]["steps"] if rs else None,
            "load_avg_per_run": a["load_avg_per_run"],
            "time_split_mean_s": a["time_split_mean_s"],
            "tie": a["tie"],
            "runs": rs,
        }
    base16 = ref["base_avg@n"]["mean"]
    gain16 = (
        None
        if base16 is None or ref["final_avg@n"]["mean"] is None
        else (ref["final_avg@n"]["mean"] - (gate_result["base_avg@n"] if gate_result else base16))
    )
    g_cfg = s["gate"]
    gate_verdict = {
        "base_avg@n": gate_result["base_avg@n"] if gate_result else None,
        "base_in_range": gate_result["in_range"] if gate_result else None,
        "gain_16": gain16,
        "gain_16_enough": None if gain16 is None else gain16 >= g_cfg["min_gain_16"],
    }
    gate_verdict["valid"] = bool(gate_verdict["base_in_range"] and gate_verdict["gain_16_enough"])
    pilot_runs = [r for r in runs if r["phase"] == "pilot"]
    results = {
        "benchmark": "group_size",
        "accuracy_gap": plain_vs_ref["gap"],
        "accuracy_gap_ci95": plain_vs_ref["gap_ci95"],
        "accuracy_gap_per_seed": plain_vs_ref["gap_per_seed"],
        "time_ratio": None
        if None in (plain["train_wall_s"]["mean"], ref["train_wall_s"]["mean"])
        else plain["train_wall_s"]["mean"] / ref["train_wall_s"]["mean"],
        "time_ratio_per_seed": plain_vs_ref["time_ratio_per_seed"],
        "rollout_ratio": None
        if None in (groups["2"]["rollouts"], groups["16"]["rollouts"])
        else groups["2"]["rollouts"] / groups["16"]["rollouts"],
        "seeds": plain_vs_ref["paired_seeds"],
        "lr_sweep": [
            {
                "arm": r["arm"],
                "group_size": r["group_size"],
                "lr": r["lr"],
                "validation_avg@n": r["final"]["avg@n"],
                "n": r["final"]["n"],
                "steps": r["steps"],
                "train_wall_s": r["train_wall_s"],
            }
            for r in sorted(pilot_runs, key=lambda r: (list(s["arms"]).index(r["arm"]), r["lr"]))
        ],
        "chosen_lr": {"2": plain["lr"], "16": ref["lr"]},
        "gate": gate_verdict,
        "equal_wall_clock": [
            {
                "seed": x["seed"],
                "wall_s": x["wall_s"],
                "2-GRPO_final": x["arm_final"],
                "16-GRPO_at_that_wall_clock": x["16-GRPO_at_that_wall_clock"],
            }
            for x in plain_vs_ref["equal_wall_clock"]
        ],
        "arms": arms,
        "best_pair_arm": best,
        "best_pair_gap": arms[best]["gap"] if best else None,
        "best_pair_gap_ci95": arms[best]["gap_ci95"] if best else None,
        "best_pair_time_ratio": arms[best]["time_ratio"] if best else None,
        "goal": goal,
        "groups": groups,
        "settings": {k: v for k, v in s.items()},
        **provenance("group_size.py", argv, started, load_before),
    }
    if best is not None:
        b = arms[best]
        results["goal"] = dict(
            goal,
            met=b["gap"] <= goal["accuracy_gap_max_points"] and b["time_ratio"] <= goal["time_ratio_max"],
            interval_narrow_enough=b["gap_ci95"] is not None
            and b["gap_ci95"] <= goal["gap_interval_max_points"],
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "group_size.json").write_text(json.dumps(results, indent=1) + "\n")
    if any(a["runs"] for a in arms.values()):
        plot(results, out_dir / "group_size.png")
    return results


def tie_summary(rs: list[dict], g: int) -> dict:
    """Measured tied-group fraction (first and last tenth of training) against p^G + (1 − p)^G over
    the held-out problems, from the base evaluation of the gate and the final n_final evaluation."""
    if not rs:
        return {}
    tenth = max(1, min(len(r["tied_fraction"]) for r in rs) // 10)
    return {
        "measured_first_tenth": statistics.fmean(statistics.fmean(r["tied_fraction"][:tenth]) for r in rs),
        "measured_last_tenth": statistics.fmean(statistics.fmean(r["tied_fraction"][-tenth:]) for r in rs),
        "predicted_at_end": statistics.fmean(
            x for r in rs if (x := tie_prediction(r["final_histogram"] or [0], g)) is not None
        )
        if any(r["final_histogram"] for r in rs)
        else None,
        "note": "prediction from the held-out problems' per-problem accuracy (same distribution as training); "
        "measured over training batches (the first round of each group), with temperature 1.0 (the "
        "evaluation samples at 0.7)",
    }


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window` − 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


COLORS = ["tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink"]


def plot(results: dict, path: Path) -> None:
    """Held-out avg@n against rollouts and against training wall-clock (one line per seed run, ★ the
    final), the first round's tied fraction per step, and each arm's final avg@n with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(23, 5))
    arms = results["arms"]
    for (name, arm), color in zip(arms.items(), COLORS):
        for i, run in enumerate(arm["runs"]):
            curve = [p for p in run["curve"] if p["n"] == run["curve"][0]["n"]]
            label = f"{name} (lr {run['lr']:g})" if i == 0 else None
            for ax, x in zip(axes, ("rollouts", "wall_s")):
                ax.plot(
                    [p[x] for p in curve], [p["avg@n"] for p in curve], color=color, alpha=0.5, label=label
                )
                ax.plot(run["curve"][-1][x], run["curve"][-1]["avg@n"], "*", color=color, markersize=9)
            tied = moving_mean(run["tied_fraction"], max(1, len(run["tied_fraction"]) // 20))
            axes[2].plot(
                [(i + 1) / len(tied) for i in range(len(tied))], tied, color=color, alpha=0.5, label=label
            )
        final = arm["final_avg@n"]
        if final["mean"] is not None:
            axes[3].errorbar(
                [list(arms).index(name)], [final["mean"]], yerr=[final["ci95"] or 0], fmt="o", color=color
            )
    axes[0].set_xlabel("rollouts generated (extension rounds included; log)")
    axes[0].set_xscale("log")
    axes[1].set_xlabel("training wall-clock (s; start-up and evaluation excluded; log)")
    axes[1].set_xscale("log")
    axes[2].set_xlabel("fraction of training (optimizer steps)")
    axes[2].set_ylabel("tied-group fraction, first round (moving mean over 1/20 of the run)")
    axes[0].set_ylabel("held-out avg@n (★ final, n_final)")
    axes[3].set_xticks(range(len(arms)), list(arms), rotation=20, fontsize=8)
    axes[3].set_ylabel("final held-out avg@n, mean ± 95% interval")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:3]:
        ax.legend(fontsize=7)
    best = results["best_pair_arm"]
    title = "group size and pair-aware sampling, seeds " + str(results["seeds"])
    if best is not None and results["best_pair_gap"] is not None:
        ci = results["best_pair_gap_ci95"]
        title += (
            f": best pair arm {best}, {results['best_pair_gap']:+.2f} pts behind 16-GRPO"
            + (f" (±{ci:.2f})" if ci is not None else "")
            + f" at {results['best_pair_time_ratio']:.2f} of its wall-clock"
        )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
    ap.add_argument(
        "--arms", default=None, help="comma-separated arms to run (default: all; the report shows all)"
    )
    ap.add_argument("--smoke-steps", type=int, default=12)
    ap.add_argument(
        "--smoke-dir",
        default=None,
        help="where smoke writes and plan reads step times (default: RUNS_DIR/smoke)",
    )
    args = ap.parse_args(argv)
    started, load_before = datetime.now(timezone.utc), [round(x, 2) for x in os.getloadavg()]
    ctx = prepare(args)
    s = ctx["settings"]
    smoke_dir = Path(args.smoke_dir) if args.smoke_dir else Path(args.runs_dir) / "smoke"
    if args.phase == "smoke":
        smoke_dir.mkdir(parents=True, exist_ok=True)
        smoke(dict(ctx, runs_dir=smoke_dir))
    if args.phase in ("smoke", "plan"):
        print(json.dumps(plan(ctx, smoke_dir), indent=1))
        return 0
    if args.phase in ("gate", "all"):
        g = gate(ctx)
        if not g["in_range"]:
            return 3
    if args.phase in ("pilot", "all") and not pilot(ctx):
        print("pilot: not every run finished; run it again (finished runs are skipped)")
        return 1
    if args.phase in ("seeds", "all"):
        state = pilot_state(ctx)
        if not all(done for _, done in state.values()):
            raise SystemExit("seeds: the pilot has not finished (run `pilot` first)")
        n = args.seeds or len(s["seeds"])
        if n > s["max_seeds"]:
            raise SystemExit(f"--seeds {n}: at most max_seeds={s['max_seeds']}")
        seeds = list(range(n)) if args.seeds else s["seeds"]
        pilot_runs = [
            finished(ctx, pilot_job(s, arm, lr)[0]) for arm, (grid, _) in state.items() for lr in grid
        ]
        lrs = chosen_lrs(pilot_runs)
        print(f"seeds {seeds} at the pilot's learning rates {lrs}", flush=True)
        jobs = seed_jobs(ctx, lrs, seeds)
        if len(with_ray(ctx, jobs)) < len(jobs):
            print("seeds: not every run finished; run it again (finished runs are skipped)")
            return 1
    if args.phase in ("report", "all", "seeds"):
        res = report(ctx, Path(args.out_dir), started, load_before, argv)
        keys = ("accuracy_gap", "accuracy_gap_ci95", "time_ratio", "rollout_ratio", "seeds", "chosen_lr")
        summary = {k: res[k] for k in keys}
        summary["arms"] = {
            name: {k: a.get(k) for k in ("lr", "lr_grid", "bracketed", "gap", "gap_ci95", "time_ratio")}
            for name, a in res["arms"].items()
        }
        summary |= {k: res[k] for k in ("best_pair_arm", "best_pair_gap", "best_pair_time_ratio", "gate")}
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

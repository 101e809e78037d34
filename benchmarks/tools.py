"""Does RL teach the tiny model to use its tool? The miniature of issue 25 (multi-turn episodes with tools).

    python benchmarks/tools.py all       # gate → pilot → seeds → report; resumable, run by run
    python benchmarks/tools.py gate      # the base policy on held_out: with the tool, and the two controls
    python benchmarks/tools.py pilot     # every learning rate of the grid, one seed, on the validation split
    python benchmarks/tools.py seeds     # 2-GRPO (3 seeds) and 16-GRPO (1 seed) at the pilot's choices
    python benchmarks/tools.py report    # aggregate the run files → results/tools.json
    python benchmarks/tools.py smoke [--smoke-steps N]   # one short 2-GRPO run (scratch): step time, learning
    python benchmarks/tools.py plan      # the whole benchmark's time from the smoke's measurements
    common options: [--config benchmarks/tools.yaml] [--model-cache DIR] [--runs-dir DIR] [--out-dir DIR]

Everything that defines the experiment is in benchmarks/tools.yaml, committed before the first seed ran; every
run file records that file's sha256 and the report refuses to mix settings.

Task: a*b, a three-digit by a two-digit number, answered \\boxed{a*b} and checked by the project's math verifier;
four disjoint splits (held-out, validation, train, warm start). Base policy: the embedded tool model's
architecture and tokenizer, warm-started (envs/task.py) on the warm-start split only, on the format of a tool
call and of the final answer, with each digit of the call's operands wrong with probability `noise`: it calls
the calculator from its first step and is right only when it copied both operands right.

Gate (before any run trains): the base policy's held-out avg@n with the calculator must be within
[base_min, base_max] points. Runs: `duet train env.name=calculator` (the driver in this process) with the
presets 2-grpo (64 prompts x 2 per step) and 16-grpo (8 x 16): the same episodes per step and the same
steps. Pilot: each configuration at each learning rate of its grid on the validation split; the seeds run at
each one's best. After each seed run: held-out avg@n with the calculator, and the two controls with n_controls
samples: no tool access (the call gets an empty observation) and a tool that returns a wrong product (the
right one plus one), both environments of benchmarks/tool_controls.py given by import path as a user's are.

Results (benchmarks/results/tools.json), accuracies and gains in points (0-100): tool_gain_2grpo (mean over
its seeds of held-out accuracy after RL minus the base's), tool_gain_16grpo, no_tool_accuracy and
wrong_tool_accuracy (the higher of before and after RL: the gate's on the base policy, the highest after any
seed run), engine_busy_fraction (the engines' time with a request in vLLM / the steps' generation time, over
the 2-GRPO seed runs: in synchronous lock-step rounds the engine waits while the tools answer), tool time per
step (the tool workers' time, and the share of the generation time the episodes waited on tools), the gate,
the pilot, per-seed figures, machine, date and command. One JSON file per run in --runs-dir (default
benchmarks/results/tools_runs/): a run whose file exists is skipped, so an interrupted benchmark goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
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
# The tool workers import the controls (benchmarks.tool_controls) by name: the repository on their path.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

from benchmarks.common import RESULTS, provenance  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "tools.yaml"
SPLITS = ("held_out", "validation", "train", "warm_start")


# ---------------------------------------------------------------- settings and splits (pure)


def load_settings(path: Path) -> dict:
    """The committed settings, checked against what issue 25 asks of the experiment."""
    import yaml

    from envs.task import multiplication_universe

    text = path.read_text()
    s = yaml.safe_load(text)
    s["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    t, p, g = s["task"], s["protocol"], s["gate"]
    problems = []
    if sum(t[k] for k in SPLITS) > len(multiplication_universe()):
        problems.append("task: the splits ask for more problems than the task has (81,000)")
    if p["prompts_per_step_2"] * 2 != p["prompts_per_step_16"] * 16:
        problems.append("protocol: 2-GRPO and 16-GRPO must make the same episodes per step")
    if steps_of(s) < 1 or (p["epochs"] * t["train"]) % p["prompts_per_step_2"]:
        problems.append("protocol.epochs x task.train must be a whole number of 2-GRPO steps")
    if not 0 <= g["base_min"] < g["base_max"] <= 100:
        problems.append("gate: base_min < base_max, in points (0-100)")
    if len(s["seeds"]["2"]) < 3 or len(s["seeds"]["16"]) < 1:
        problems.append("seeds: 2-GRPO needs 3, 16-GRPO 1")
    for k in ("2", "16"):
        if len(s["pilot"]["lr"][k]) < 3:
            problems.append(f"pilot.lr.{k}: fewer than 3 learning rates")
    if set(s["controls"]) != {"no_tool", "wrong_tool"}:
        problems.append("controls: no_tool and wrong_tool")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return s


def steps_of(s: dict) -> int:
    """Optimizer steps of every seed run: 2-GRPO's epochs over the train split (16-GRPO runs as many)."""
    p = s["protocol"]
    return int(p["epochs"] * s["task"]["train"] // p["prompts_per_step_2"])


def split_problems(s: dict) -> dict[str, list[tuple[int, int]]]:
    """Disjoint splits of the task's problems: shuffled with split_seed, cut in the order of SPLITS."""
    from envs.task import multiplication_universe

    t = s["task"]
    universe = multiplication_universe()
    random.Random(t["split_seed"]).shuffle(universe)
    out, at = {}, 0
    for name in SPLITS:
        out[name] = universe[at : at + t[name]]
        at += t[name]
    return out


def write_splits(splits: dict[str, list[tuple[int, int]]], folder: Path) -> dict[str, Path]:
    """One JSONL per split except the warm start's ({"problem", "answer", "source"}, as data.path reads)."""
    from envs.task import multiplication_problem

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in splits.items():
        if name == "warm_start":
            continue
        path = folder / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(multiplication_problem(a, b)) + "\n" for a, b in pairs))
        tmp.replace(path)
        paths[name] = path
    return paths


def run_name(phase: str, g: int, lr: float, seed: int) -> str:
    return f"{phase}-g{g}-lr{lr:g}-seed{seed}"


def points(x: float | None) -> float | None:
    return None if x is None else round(100.0 * x, 2)


# ---------------------------------------------------------------- configs and evaluation


def run_config(s: dict, ctx: dict, g: int, lr: float, seed: int, steps: int, eval_split: str, run_dir: Path):
    from cluster.config import load_config

    p, e, env = s["protocol"], s["evaluation"], s["env"]
    return load_config(
        preset=f"{g}-grpo",
        overrides=[
            f"run.seed={seed}",
            f"run.run_dir={run_dir}",
            "run.progress=false",
            "run.ray_metrics=false",
            "checkpoint.final=false",
            "control.enabled=false",
            f"model.path={ctx['model']}",
            f"data.path={ctx['files']['train']}",
            f"env.name={env['name']}",
            f"env.max_turns={env['max_turns']}",
            f"rollout.num_engines={p['engines']}",
            f"rollout.prompts_per_step={p['prompts_per_step_2'] if g == 2 else p['prompts_per_step_16']}",
            f"rollout.temperature={p['rollout_temperature']}",
            f"rollout.max_tokens={env['max_tokens_per_turn']}",
            "rewards.verifier=math",
            f"learner.lr={lr}",
            f"train.steps={steps}",
            f"eval.path={ctx['files'][eval_split]}",
            "eval.every_steps=0",  # the Recorder evaluates
            f"eval.samples_per_prompt={e['n']}",
            f"eval.temperature={e['temperature']}",
            f"eval.top_p={e['top_p']}",
            f"eval.top_k={e['top_k']}",
            f"eval.max_tokens={env['max_tokens_per_turn']}",
        ],
    )


def evaluate_with(fleet, rewards, cfg, prompts, n: int, env_name: str | None = None) -> dict:
    """Held-out avg@n of the fleet's current weights, with the run's tool pool, or (env_name) with a pool of
    that environment started for the call (a control), swapped in and out of the fleet."""
    from cluster.evaluation import evaluate
    from envs.pool import shutdown_tool_pool, start_tool_pool, wait_tool_pool

    own = fleet.tools
    pool = None
    if env_name is not None:
        pool = start_tool_pool(cfg.model_copy(update={"env": cfg.env.model_copy(update={"name": env_name})}))
        wait_tool_pool(pool)
        fleet.tools = pool
    try:
        summary = evaluate(fleet, rewards, prompts, n, cfg.eval.sampling(), cfg.rewards.verifier)
    finally:
        fleet.tools = own
        if pool is not None:
            shutdown_tool_pool(pool)
    o = summary["overall"]
    return {"avg@n": o["avg@n"], "n": n, "mean_length": o["mean_length"], "elapsed_s": summary["elapsed_s"]}


def engines_busy_s(fleet) -> float:
    import ray

    return sum(ray.get([e.busy_seconds.remote() for e in fleet.engines]))


class Recorder:
    """The driver's per-step callback (Trainer.run(on_step=...)): the step's figures, the engines' busy time
    during the step (read before and after the callback's own evaluations, which it leaves out), and at
    the last step the evaluations (with the tool; with `controls`, the two controls too)."""

    def __init__(self, s: dict, controls: bool) -> None:
        self.s, self.controls = s, controls
        self.steps: list[dict] = []
        self.final: dict = {}
        self.startup_s = self.eval_s = 0.0
        self._busy = 0.0
        self._t0 = time.perf_counter()

    def __call__(self, trainer, m: dict) -> None:
        busy = engines_busy_s(trainer.fleet)
        if trainer.step == 0:
            self.startup_s = time.perf_counter() - self._t0
            self._busy = busy
            return
        keys = ("time/step_s", "time/generate_s", "time/generate_model_s", "time/generate_tool_s",
                "time/train_s", "reward/mean", "reward/tied_fraction", "tools/calls", "tools/errors",
                "tools/time_s", "tokens/observation", "tokens/generated", "episodes/turns_mean", "rollouts")  # fmt: skip
        row = {k: m.get(k) for k in keys}
        row["engine_busy_s"] = busy - self._busy
        row["load"] = round(os.getloadavg()[0], 2)
        self.steps.append(row)
        if trainer.step == trainer.cfg.train.steps:
            t0 = time.perf_counter()
            from cluster.evaluation import eval_prompts

            prompts, e = eval_prompts(trainer.cfg), self.s["evaluation"]
            cfg, fleet, rewards = trainer.cfg, trainer.fleet, trainer.rewards
            self.final["tool"] = evaluate_with(fleet, rewards, cfg, prompts, e["n"])
            if self.controls:
                for name, env_name in self.s["controls"].items():
                    self.final[name] = evaluate_with(fleet, rewards, cfg, prompts, e["n_controls"], env_name)
            self.eval_s += time.perf_counter() - t0
        self._busy = engines_busy_s(trainer.fleet)


def one_run(ctx: dict, phase: str, g: int, lr: float, seed: int, steps: int, eval_split: str, controls: bool):
    from cluster.driver import Trainer

    s = ctx["settings"]
    run_dir = ctx["scratch"] / run_name(phase, g, lr, seed)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted before its result file: start it over
    run_dir.mkdir(parents=True)
    cfg = run_config(s, ctx, g, lr, seed, steps, eval_split, run_dir)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    rec = Recorder(s, controls)
    Trainer(cfg, run_dir).run(on_step=rec)
    gen = sum(r["time/generate_s"] for r in rec.steps)
    return {
        "phase": phase,
        "group_size": g,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "eval_split": eval_split,
        "settings_sha256": s["sha256"],
        "final": rec.final,
        "accuracy_points": points(rec.final["tool"]["avg@n"]),
        "engine_busy_fraction": sum(r["engine_busy_s"] for r in rec.steps) / gen if gen else None,
        "step_s_median": statistics.median(r["time/step_s"] for r in rec.steps[1:] or rec.steps),
        "tool_time_s_per_step": statistics.fmean(r["tools/time_s"] for r in rec.steps),
        "tool_wait_share": sum(r["time/generate_tool_s"] for r in rec.steps) / gen if gen else None,
        "steps_detail": rec.steps,
        "startup_s": rec.startup_s,
        "eval_s": rec.eval_s,
        "total_s": time.perf_counter() - t0,
        "load_avg_before": load_before,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- phases


def prepare(args: argparse.Namespace) -> dict:
    """Settings, the split files and the warm-started model (built once, cached)."""
    from envs.task import ensure_tool_model

    s = load_settings(Path(args.config))
    splits = split_problems(s)
    data_dir = Path(os.path.expanduser(args.model_cache)) / f"tools-task-{s['sha256'][:12]}"
    files = write_splits(splits, data_dir)
    w = s["warm_start"]
    t0 = time.perf_counter()
    model = ensure_tool_model(
        args.model_cache, splits["warm_start"], w["steps"], w["lr"], w["batch"], w["noise"], w["seed"]
    )
    print(
        f"task files in {data_dir}; warm-started model {model} ({time.perf_counter() - t0:.0f} s)", flush=True
    )
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    return {"settings": s, "files": files, "model": str(model), "runs_dir": runs_dir, "args": args}


def finished(ctx: dict, name: str) -> dict | None:
    path = ctx["runs_dir"] / f"{name}.json"
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
    path = ctx["runs_dir"] / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(path)


def start_ray(ctx: dict) -> None:
    from cluster.config import load_config
    from cluster.runtime import init_ray

    init_ray(load_config(overrides=[f"model.path={ctx['model']}", "env.name=calculator"]))


def with_ray(ctx: dict, jobs: list[tuple[str, dict]]) -> list[dict]:
    """Run the jobs not yet finished, in order, in one Ray instance; each result is saved as it ends."""
    todo = [(name, kw) for name, kw in jobs if finished(ctx, name) is None]
    if todo:
        import ray

        ctx["scratch"] = Path(tempfile.mkdtemp(prefix="duet-tools-"))
        start_ray(ctx)
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
                controls = {k: points(v["avg@n"]) for k, v in run["final"].items() if k != "tool"}
                print(
                    f"{name}: accuracy {run['accuracy_points']} points {controls or ''}, {run['steps']} steps "
                    f"({run['step_s_median']:.2f} s/step), busy {run['engine_busy_fraction']:.2f}, start-up "
                    f"{run['startup_s']:.0f} s, eval {run['eval_s']:.0f} s [{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
        finally:
            ray.shutdown()
            shutil.rmtree(ctx["scratch"], ignore_errors=True)
    return [run for name, _ in jobs if (run := finished(ctx, name)) is not None]


def gate(ctx: dict) -> dict:
    """The base policy on held_out: avg@n with the calculator (the gate), and the two controls."""
    path = ctx["runs_dir"] / "gate.json"
    if path.exists():
        g = json.loads(path.read_text())
        if g.get("settings_sha256") == ctx["settings"]["sha256"]:
            return g
    import ray

    from cluster.evaluation import eval_prompts
    from cluster.fleet import RolloutFleet
    from cluster.placement import make_plan
    from envs.pool import shutdown_tool_pool, start_tool_pool, wait_tool_pool
    from rewards.pool import RewardPool

    s = ctx["settings"]
    cfg = run_config(s, ctx, 2, 1e-4, 0, 1, "held_out", Path(tempfile.mkdtemp(prefix="duet-tools-gate-")))
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    start_ray(ctx)
    fleet = rewards = tools = None
    try:
        fleet = RolloutFleet(cfg, make_plan(cfg), ctx["model"])
        tools = start_tool_pool(cfg)
        rewards = RewardPool(cfg.rewards)
        fleet.start(cfg.rollout.num_engines)
        wait_tool_pool(tools)
        fleet.tools = tools
        prompts, e = eval_prompts(cfg), s["evaluation"]
        base = evaluate_with(fleet, rewards, cfg, prompts, e["n"])
        controls = {
            k: evaluate_with(fleet, rewards, cfg, prompts, e["n_controls"], v)
            for k, v in s["controls"].items()
        }
    finally:
        for part in (fleet, rewards):
            if part is not None:
                part.shutdown()
        if tools is not None:
            shutdown_tool_pool(tools)
        ray.shutdown()
    lo, hi = s["gate"]["base_min"], s["gate"]["base_max"]
    base_points = points(base["avg@n"])
    result = {
        "settings_sha256": s["sha256"],
        "model": ctx["model"],
        "base": base,
        "base_points": base_points,
        "controls": controls,
        "control_points": {k: points(v["avg@n"]) for k, v in controls.items()},
        "in_range": lo <= base_points <= hi,
        "range_points": [lo, hi],
        "elapsed_s": time.perf_counter() - t0,
        "load_avg_before": load_before,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"gate: base held-out accuracy with the tool {base_points} points (must be in [{lo}, {hi}]): "
        f"{'PASS' if result['in_range'] else 'FAIL: change the warm start before any claim'}; controls "
        f"{result['control_points']}",
        flush=True,
    )
    return result


def pilot_jobs(ctx: dict) -> list[tuple[str, dict]]:
    pl = ctx["settings"]["pilot"]
    jobs = []
    for i in range(max(len(pl["lr"]["2"]), len(pl["lr"]["16"]))):
        for g in (2, 16):  # interleaved: machine load hits both alike
            if i < len(pl["lr"][str(g)]):
                lr = pl["lr"][str(g)][i]
                kw = dict(
                    phase="pilot",
                    g=g,
                    lr=lr,
                    seed=pl["seed"],
                    steps=pl["steps"],
                    eval_split="validation",
                    controls=False,
                )
                jobs.append((run_name("pilot", g, lr, pl["seed"]), kw))
    return jobs


def chosen_lrs(pilot_runs: list[dict]) -> dict[int, float]:
    best: dict[int, dict] = {}
    for r in pilot_runs:
        if r["group_size"] not in best or r["accuracy_points"] > best[r["group_size"]]["accuracy_points"]:
            best[r["group_size"]] = r
    return {g: r["lr"] for g, r in best.items()}


def seed_jobs(ctx: dict, lrs: dict[int, float]) -> list[tuple[str, dict]]:
    s = ctx["settings"]
    jobs = []
    for i in range(max(len(s["seeds"]["2"]), len(s["seeds"]["16"]))):
        for g in (2, 16):
            if i < len(s["seeds"][str(g)]):
                seed = s["seeds"][str(g)][i]
                kw = dict(
                    phase="seed",
                    g=g,
                    lr=lrs[g],
                    seed=seed,
                    steps=steps_of(s),
                    eval_split="held_out",
                    controls=True,
                )
                jobs.append((run_name("seed", g, lrs[g], seed), kw))
    return jobs


def smoke(ctx: dict) -> list[dict]:
    """One short 2-GRPO run on the real task, model and protocol, evaluated on held_out with the controls:
    the step time and evaluation cost the plan is sized from, and whether it learns at all. Saved under
    smoke/ (never mixed into the report)."""
    s = ctx["settings"]
    kw = dict(
        phase="smoke",
        g=2,
        lr=s["pilot"]["lr"]["2"][1],
        seed=0,
        steps=ctx["args"].smoke_steps,
        eval_split="held_out",
        controls=True,
    )
    return with_ray(ctx, [(run_name("smoke", 2, kw["lr"], 0), kw)])


def plan(ctx: dict) -> dict:
    """The whole benchmark's minutes from the smoke's step time, start-up and evaluation cost."""
    s = ctx["settings"]
    runs = [json.loads(p.read_text()) for p in sorted(ctx["runs_dir"].glob("smoke-*.json"))]
    if not runs:
        raise SystemExit("plan: run `smoke` first (it measures the step time)")
    r = runs[-1]
    e = s["evaluation"]
    held = s["task"]["held_out"]
    per_completion = r["eval_s"] / (held * (e["n"] + 2 * e["n_controls"]))
    step, startup = r["step_s_median"], r["startup_s"]
    pilot_n = len(s["pilot"]["lr"]["2"]) + len(s["pilot"]["lr"]["16"])
    seeds_n = len(s["seeds"]["2"]) + len(s["seeds"]["16"])
    phases = {
        "gate": startup + held * (e["n"] + 2 * e["n_controls"]) * per_completion,
        "pilot": pilot_n
        * (startup + s["pilot"]["steps"] * step + s["task"]["validation"] * e["n"] * per_completion),
        "seeds": seeds_n
        * (startup + steps_of(s) * step + held * (e["n"] + 2 * e["n_controls"]) * per_completion),
    }
    return {
        "measured": {"s/step": step, "start-up s/run": startup, "eval s/episode": per_completion},
        "phases_min": {k: round(v / 60, 1) for k, v in phases.items()},
        "total_min": round(sum(phases.values()) / 60, 1),
    }


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
    gate_path = ctx["runs_dir"] / "gate.json"
    if not gate_path.exists():
        raise SystemExit("report: run `gate` first")
    g = json.loads(gate_path.read_text())
    seeds = {
        k: sorted((r for r in runs if r["phase"] == "seed" and r["group_size"] == k), key=lambda r: r["seed"])
        for k in (2, 16)
    }
    pilot = sorted((r for r in runs if r["phase"] == "pilot"), key=lambda r: (r["group_size"], r["lr"]))

    def gain(rs: list[dict]) -> float | None:
        return round(statistics.fmean(r["accuracy_points"] for r in rs) - g["base_points"], 2) if rs else None

    def control(name: str) -> float:
        after = [points(r["final"][name]["avg@n"]) for rs in seeds.values() for r in rs if name in r["final"]]
        return max([g["control_points"][name], *after])

    two = seeds[2]
    gen = sum(st["time/generate_s"] for r in two for st in r["steps_detail"])
    busy = sum(st["engine_busy_s"] for r in two for st in r["steps_detail"])
    results = {
        "benchmark": "tools",
        "tool_gain_2grpo": gain(two),
        "tool_gain_16grpo": gain(seeds[16]),
        "no_tool_accuracy": control("no_tool"),
        "wrong_tool_accuracy": control("wrong_tool"),
        "engine_busy_fraction": round(busy / gen, 3) if gen else None,
        "base_accuracy": g["base_points"],
        "accuracy_2grpo": [r["accuracy_points"] for r in two],
        "accuracy_16grpo": [r["accuracy_points"] for r in seeds[16]],
        "tool_time_s_per_step": round(statistics.fmean(r["tool_time_s_per_step"] for r in two), 4)
        if two
        else None,
        "tool_wait_share_of_generation": round(statistics.fmean(r["tool_wait_share"] for r in two), 3)
        if two
        else None,
        "step_s_median": {str(k): [r["step_s_median"] for r in rs] for k, rs in seeds.items()},
        "chosen_lr": {str(k): v for k, v in chosen_lrs(pilot).items()},
        "lr_sweep": [
            {"group_size": r["group_size"], "lr": r["lr"], "validation_points": r["accuracy_points"]}
            for r in pilot
        ],
        "gate": {k: g[k] for k in ("base_points", "control_points", "in_range", "range_points")},
        "seeds": {str(k): [r["seed"] for r in rs] for k, rs in seeds.items()},
        "runs": {
            str(k): [
                {
                    x: r[x]
                    for x in (
                        "seed",
                        "lr",
                        "steps",
                        "accuracy_points",
                        "final",
                        "engine_busy_fraction",
                        "step_s_median",
                        "tool_time_s_per_step",
                        "startup_s",
                        "eval_s",
                    )
                }
                for r in rs
            ]
            for k, rs in seeds.items()
        },
        "goal": s["goal"],
        "settings": {k: v for k, v in s.items()},
        **provenance("tools.py", argv, started, load_before),
    }
    if results["tool_gain_2grpo"] is not None:
        goal = s["goal"]
        results["goal"] = dict(
            goal,
            met=results["tool_gain_2grpo"] >= goal["tool_gain_2grpo_min"]
            and max(results["no_tool_accuracy"], results["wrong_tool_accuracy"]) <= goal["control_max"],
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tools.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["all", "gate", "pilot", "seeds", "report", "smoke", "plan"])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--model-cache", default="~/.cache/duet-rl")
    ap.add_argument("--runs-dir", default=str(RESULTS / "tools_runs"))
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--smoke-steps", type=int, default=8)
    args = ap.parse_args(argv)
    started, load_before = datetime.now(timezone.utc), [round(x, 2) for x in os.getloadavg()]
    ctx = prepare(args)
    if args.phase in ("smoke", "plan"):
        ctx["runs_dir"] = Path(args.runs_dir) / "smoke"
        ctx["runs_dir"].mkdir(parents=True, exist_ok=True)
        if args.phase == "smoke":
            smoke(ctx)
        print(json.dumps(plan(ctx), indent=1))
        return 0
    if args.phase in ("gate", "all") and not gate(ctx)["in_range"]:
        return 3
    if args.phase in ("pilot", "all"):
        runs = with_ray(ctx, pilot_jobs(ctx))
        if len(runs) < len(pilot_jobs(ctx)):
            print("pilot: not every run finished; run it again (finished runs are skipped)")
            return 1
    if args.phase in ("seeds", "all"):
        pilot_runs = [r for name, _ in pilot_jobs(ctx) if (r := finished(ctx, name)) is not None]
        if len(pilot_runs) < len(pilot_jobs(ctx)):
            raise SystemExit("seeds: the pilot has not finished (run `pilot` first)")
        lrs = chosen_lrs(pilot_runs)
        print(f"seeds at the pilot's learning rates {lrs}", flush=True)
        jobs = seed_jobs(ctx, lrs)
        if len(with_ray(ctx, jobs)) < len(jobs):
            print("seeds: not every run finished; run it again (finished runs are skipped)")
            return 1
    if args.phase in ("report", "all", "seeds"):
        res = report(ctx, Path(args.out_dir), started, load_before, argv)
        keys = ("tool_gain_2grpo", "tool_gain_16grpo", "no_tool_accuracy", "wrong_tool_accuracy",
                "engine_busy_fraction", "base_accuracy", "chosen_lr", "goal")  # fmt: skip
        print(json.dumps({k: res[k] for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

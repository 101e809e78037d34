"""The paper's claim in miniature: 2-GRPO against 16-GRPO on the same rollout budget per step.

    python benchmarks/group_size.py [--seeds 3] [--epochs 10] [--quick] [--model-cache DIR]

Task: the synthetic additions `a+b=` (answer in \\boxed{}), verified by the math verifier; base policy:
the embedded tiny Llama, warm-started so that it solves part of the task (model.path None builds it).
Held-out set: eval.synthetic_problems = 200 problems of the same distribution, with their own seed
(operands 0-9 make only 100 distinct problems, so "held-out" means a separate draw, not unseen sums).

Protocol (arXiv 2510.00977: 32 prompts × 16 at lr 1e-6 against 256 prompts × 2 at lr 8e-6, clip
0.2/0.28, temperature 1.0, the same epochs over the same training prompts):
- 16-GRPO: P prompts × 16 rollouts per optimizer step at lr η;
- 2-GRPO: 8P prompts × 2 rollouts per step at lr 8η: the same rollouts per step, 1/8 of the steps
  and 1/8 of the rollouts over the run;
- both: N training problems, E epochs, steps = E·N / prompts_per_step, presets `16-grpo` / `2-grpo`.
Defaults: N = 256, E = 10, P = 8 (16-GRPO: 8 × 16, 320 steps; 2-GRPO: 64 × 2, 40 steps; 128
rollouts per step), η_2 = 3e-4 (the default demo's 64 × 2 setting), η_16 = 3.75e-5.
Every run starts from the same base model. The held-out set is evaluated (avg@n, pass@k at
temperature 0.7, top-p 0.8, top-k 20, cfg.eval's defaults) before training, at fixed fractions of an
epoch, and at the end with n = 32 (the paper's Mean@32): the final accuracy is that last avg@32.

Measured per run: the accuracy curve against optimizer steps, rollouts generated and training
wall-clock; wall-clock = the sum of the driver's time/step_s (generate, reward, train, broadcast and
the loop's own bookkeeping); engine/learner start-up and the evaluations are timed apart and excluded.
All runs share one process and one Ray instance and are interleaved by seed (2-GRPO seed 0, 16-GRPO
seed 0, 2-GRPO seed 1, ...) so that load from other processes affects both group sizes alike.

Writes benchmarks/results/group_size.json (per group size: per-seed final accuracies and wall-clock,
their means; accuracy_gap = mean 16-GRPO − mean 2-GRPO accuracy in points; time_ratio = mean 2-GRPO
wall-clock / mean 16-GRPO; machine, date, command) and group_size.png (accuracy against wall-clock and
against rollouts). Goals from the paper: accuracy_gap ≤ 2 points, time_ratio ≤ 0.30.
"""

from __future__ import annotations

import argparse
import itertools
import json
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from benchmarks.common import add_common_arguments, provenance  # noqa: E402
from cluster.config import Config, load_config  # noqa: E402
from cluster.driver import Trainer  # noqa: E402
from cluster.evaluation import eval_metrics  # noqa: E402
from cluster.runtime import init_ray  # noqa: E402

SPLIT = {
    "generate": "time/generate_s",
    "reward_wait": "time/reward_wait_s",  # scoring overlaps generation: only the wait after it
    "train": "time/train_s",
    "broadcast": "time/broadcast_s",
}


class Recorder:
    """The benchmark's bookkeeping, as the driver's per-step callback (`Trainer.run(on_step=...)`):
    evaluations on the held-out set (the starting policy, every eval.every_steps, the final model with
    `final_n` samples), the training time split and the rollouts."""

    def __init__(self, final_n: int) -> None:
        self.final_n = final_n
        self.curve: list[dict] = []
        self.train_reward: list[float] = []
        self.loop_s = self.eval_s = self.startup_s = 0.0
        self.rollouts = 0
        self.split = dict.fromkeys([*SPLIT, "other"], 0.0)
        self._t0 = time.perf_counter()

    def __call__(self, trainer: Trainer, m: dict) -> None:
        cfg = trainer.cfg
        if trainer.step == 0:  # after start-up: the base policy
            self.startup_s = time.perf_counter() - self._t0
            self._evaluate(trainer, cfg.eval.samples_per_prompt)
            return
        self.loop_s += m["time/step_s"]
        self.rollouts += m["rollouts"]
        self.train_reward.append(round(m["reward/mean"], 4))
        parts = {name: m.get(key, 0.0) for name, key in SPLIT.items()}
        parts["other"] = m["time/step_s"] - sum(parts.values())
        for name, v in parts.items():
            self.split[name] += v
        every = cfg.eval.every_steps
        if trainer.step == cfg.train.steps:  # the final model, with the larger n
            m.update(eval_metrics(self._evaluate(trainer, self.final_n), prefix="final_eval/"))
        elif every and trainer.step % every == 0:  # the driver evaluated (eval.every_steps is set)
            self._record(
                trainer, {k[5:]: v for k, v in m.items() if k.startswith("eval/")}, m["eval/samples"]
            )

    def _evaluate(self, trainer: Trainer, n: int) -> dict:
        summary = trainer.evaluate(n)
        self._record(trainer, summary["overall"], n)
        self.eval_s += summary["elapsed_s"]
        return summary

    def _record(self, trainer: Trainer, overall: dict, n: int) -> None:
        point = {"step": trainer.step, "rollouts": self.rollouts, "wall_s": round(self.loop_s, 3), "n": n}
        point.update({k: v for k, v in overall.items() if k.startswith(("avg@", "pass@"))})
        self.curve.append(point)


def run_config(args: argparse.Namespace, group_size: int, seed: int, run_dir: Path) -> Config:
    p16 = args.prompts_16
    prompts = p16 if group_size == 16 else 8 * p16
    lr = args.lr_2 / 8 if group_size == 16 else args.lr_2
    steps = args.epochs * args.train_problems // prompts
    steps_per_epoch = args.train_problems // prompts
    every = max(1, steps_per_epoch // args.evals_per_epoch)
    overrides = [
        f"run.seed={seed}",
        f"run.run_dir={run_dir}",
        "run.progress=false",
        "run.ray_metrics=false",
        "checkpoint.final=false",
        "control.enabled=false",
        f"model.cache_dir={args.model_cache}",
        f"data.synthetic_problems={args.train_problems}",
        f"rollout.prompts_per_step={prompts}",
        "rollout.temperature=1.0",
        f"learner.lr={lr}",
        f"train.steps={steps}",
        f"eval.synthetic_problems={args.eval_problems}",
        f"eval.samples_per_prompt={args.eval_n}",
        f"eval.every_steps={every}",
    ]
    return load_config(overrides=overrides, preset=f"{group_size}-grpo")


def one_run(args: argparse.Namespace, group_size: int, seed: int, root: Path) -> dict:
    run_dir = root / f"g{group_size}-seed{seed}"
    cfg = run_config(args, group_size, seed, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rec = Recorder(args.final_n)
    Trainer(cfg, run_dir).run(on_step=rec)
    final = rec.curve[-1]
    return {
        "group_size": group_size,
        "seed": seed,
        "prompts_per_step": cfg.rollout.prompts_per_step,
        "lr": cfg.learner.lr,
        "steps": cfg.train.steps,
        "eval_every_steps": cfg.eval.every_steps,
        "final_accuracy": final["avg@n"],
        "final_pass@k": {k: v for k, v in final.items() if k.startswith("pass@")},
        "base_accuracy": rec.curve[0]["avg@n"],
        "wall_clock_s": rec.loop_s,
        "time_split_s": rec.split,
        "rollouts": rec.rollouts,
        "startup_s": rec.startup_s,
        "eval_s": rec.eval_s,
        "total_s": time.perf_counter() - t0,
        "curve": rec.curve,
        "train_reward": rec.train_reward,
    }


def aggregate(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out: dict = {"runs": runs}
    for key in ("final_accuracy", "wall_clock_s", "rollouts", "steps", "base_accuracy"):
        vals = [r[key] for r in ok]
        out[f"{key}_per_seed"] = vals
        out[f"{key}_mean"] = statistics.fmean(vals) if vals else None
        if key in ("final_accuracy", "wall_clock_s") and len(vals) > 1:
            out[f"{key}_stdev"] = statistics.stdev(vals)
    out["time_split_mean_s"] = (
        {name: statistics.fmean(r["time_split_s"][name] for r in ok) for name in [*SPLIT, "other"]}
        if ok
        else None
    )
    return out


def _interp(curve: list[dict], key: str, x: float) -> float:
    """Accuracy of a curve at x (linear between evaluations; clamped at the ends)."""
    pts = sorted((p[key], p["avg@n"]) for p in curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pts[-1][1]


def matched_budget(groups: dict) -> dict:
    """16-GRPO's accuracy when it had spent what 2-GRPO spent in its whole run (same seed):
    the same rollouts (= the same optimizer steps here: both take 16·P rollouts per step) and the same
    training wall-clock. Interpolated on 16-GRPO's evaluation curve."""
    by_seed = {r["seed"]: r for r in groups.get("16", {}).get("runs", []) if "error" not in r}
    out: dict = {}
    for key, name in (("rollouts", "rollouts"), ("wall_s", "wall_clock_s")):
        pairs = [
            (r2["final_accuracy"], _interp(by_seed[r2["seed"]]["curve"], key, r2[name]))
            for r2 in groups.get("2", {}).get("runs", [])
            if "error" not in r2 and r2["seed"] in by_seed
        ]
        if pairs:
            out[f"same_{name}"] = {
                "2-GRPO_final_per_seed": [a for a, _ in pairs],
                "16-GRPO_at_that_point_per_seed": [b for _, b in pairs],
                "gap_points": 100 * statistics.fmean(b - a for a, b in pairs),
            }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {"2": "tab:blue", "16": "tab:orange"}
    for g, group in results["groups"].items():
        for i, run in enumerate(r for r in group["runs"] if "error" not in r):
            curve = run["curve"]
            label = f"{g}-GRPO" if i == 0 else None
            for ax, x in zip(axes, ("wall_s", "rollouts")):
                xs = [p[x] for p in curve]
                ax.plot(xs, [p["avg@n"] for p in curve], color=colors[g], alpha=0.75, label=label)
                ax.plot(curve[-1][x], curve[-1]["avg@n"], "*", color=colors[g], markersize=11)
    axes[0].set_xlabel("training wall-clock (s; start-up and evaluation excluded)")
    axes[1].set_xlabel("rollouts generated")
    st = results["settings"]
    axes[0].set_ylabel(f"held-out accuracy (avg@{st['eval_n']}; ★ final avg@{st['final_n']})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"2-GRPO vs 16-GRPO, {len(results['settings']['seeds'])} seeds: accuracy gap "
        f"{results['accuracy_gap']:+.2f} pts, time ratio {results['time_ratio']:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-problems", type=int, default=256, help="N synthetic training problems")
    ap.add_argument("--prompts-16", type=int, default=8, help="16-GRPO prompts per step (2-GRPO: 8×)")
    ap.add_argument("--lr-2", type=float, default=3e-4, help="2-GRPO lr; 16-GRPO uses 1/8 of it")
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=4, help="samples per problem of the curve's evals")
    ap.add_argument("--final-n", type=int, default=32, help="samples per problem of the final eval")
    ap.add_argument("--evals-per-epoch", type=int, default=1)
    ap.add_argument("--group-sizes", default="2,16", help="e.g. '2' for a pilot of 2-GRPO alone")
    add_common_arguments(
        ap,
        quick_help="a ~3-minute smoke version (1 seed, tiny budget)",
        keep_help="keep the run folders (metrics.jsonl)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.train_problems, args.evals_per_epoch = 1, 2, 64, 1
        args.eval_problems, args.eval_n, args.final_n = 50, 4, 8
    if args.train_problems % (8 * args.prompts_16):
        ap.error("--train-problems must be a multiple of 8 × --prompts-16 (whole 2-GRPO steps per epoch)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "group_size_quick" if args.quick else "group_size"
    if args.group_sizes != "2,16":
        name += "_g" + args.group_sizes.replace(",", "_")
    root = Path(tempfile.mkdtemp(prefix="duet-group-size-"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = datetime.now(timezone.utc)
    init_ray(run_config(args, 2, 0, root))
    sizes = [int(g) for g in args.group_sizes.split(",")]
    runs: dict[str, list[dict]] = {str(g): [] for g in sizes}
    try:
        for seed in range(args.seeds):
            for g in sizes:  # interleaved: load from other processes hits both alike
                t0 = time.perf_counter()
                try:
                    run = one_run(args, g, seed, root)
                except Exception as e:
                    traceback.print_exc()
                    run = {"group_size": g, "seed": seed, "error": f"{type(e).__name__}: {e}"}
                runs[str(g)].append(run)
                print(
                    f"G={g:>2} seed {seed}: "
                    + (
                        f"final acc {run['final_accuracy']:.3f} (base {run['base_accuracy']:.3f}), "
                        f"{run['steps']} steps, {run['rollouts']} rollouts, train {run['wall_clock_s']:.1f}s "
                        f"(start-up {run['startup_s']:.0f}s, eval {run['eval_s']:.0f}s)"
                        if "error" not in run
                        else run["error"]
                    )
                    + f"  [{time.perf_counter() - t0:.0f}s]",
                    flush=True,
                )
    finally:
        ray.shutdown()
        if not args.keep_runs:
            shutil.rmtree(root, ignore_errors=True)
    groups = {g: aggregate(rs) for g, rs in runs.items()}
    empty = {"final_accuracy_mean": None, "wall_clock_s_mean": None, "rollouts_mean": None}
    g2, g16 = groups.get("2", empty), groups.get("16", empty)
    acc2, acc16 = g2["final_accuracy_mean"], g16["final_accuracy_mean"]
    t2, t16 = g2["wall_clock_s_mean"], g16["wall_clock_s_mean"]
    results = {
        "benchmark": "group_size",
        "accuracy_gap": None if None in (acc2, acc16) else 100 * (acc16 - acc2),
        "time_ratio": None if None in (t2, t16) else t2 / t16,
        "rollout_ratio": None
        if None in (g2["rollouts_mean"], g16["rollouts_mean"])
        else g2["rollouts_mean"] / g16["rollouts_mean"],
        "goals": {"accuracy_gap_max_points": 2.0, "time_ratio_max": 0.30},
        "matched_budget": matched_budget(groups),
        "groups": groups,
        "settings": {
            "seeds": list(range(args.seeds)),
            "epochs": args.epochs,
            "train_problems": args.train_problems,
            "prompts_per_step": {"16": args.prompts_16, "2": 8 * args.prompts_16},
            "rollouts_per_step": 16 * args.prompts_16,
            "lr": {"16": args.lr_2 / 8, "2": args.lr_2},
            "eval_problems": args.eval_problems,
            "eval_n": args.eval_n,
            "final_n": args.final_n,
            "eval_sampling": run_config(args, 2, 0, root).eval.sampling().model_dump(),
            "order": "interleaved by seed: G=2 seed 0, G=16 seed 0, G=2 seed 1, ...",
            "wall_clock": "sum of time/step_s (generate + reward wait + train + broadcast + loop); "
            "start-up and evaluations excluded",
        },
        **provenance("group_size.py", argv, started, load_before),
    }
    if results["accuracy_gap"] is not None and results["time_ratio"] is not None:
        results["goals"]["met"] = results["accuracy_gap"] <= 2.0 and results["time_ratio"] <= 0.30
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("accuracy_gap", "time_ratio", "rollout_ratio")}))
    print(f"results written to {json_path}")
    if results["accuracy_gap"] is not None:
        plot(results, out_dir / f"{name}.png")
        print(f"plot written to {out_dir / f'{name}.png'}")
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""LoRA (rank 16) against full fine-tuning at a real model's size, side by side in one run.

    python benchmarks/lora.py [--model DIR] [--data sums.jsonl] [--rank 16] [--steps 10] [--quick]

SmolLM2-135M-Instruct (fp32; `python -m learner.smollm2 --out DIR --data sums.jsonl`, docs/real-model.md),
the batch of docs/real-model.md's command: 16 chat-rendered sums × 2 completions of up to 32 tokens.

1. learner step and peak memory, same batch: one transformers-sampled batch (benchmarks/real_model.py's
   generation child), then `LearnerGroup.train_step` on it `reps` times after a warm-up, for full weights
   and for `learner.lora.rank=R` (its default targets: the attention and MLP projections), in the order
   full, LoRA, LoRA, full (a drift of the machine's speed cancels out of the ratio). Peak memory: the
   learner rank's VmHWM (model load included), the larger of its two runs.
2. generation, same tokens: vLLM's offline engine on the engine's CPU settings, every completion forced to
   max_tokens (`min_tokens`), without LoRA (what a full fine-tuning run serves) and with `enable_lora` and
   a rank-R adapter of random weights on the same targets in every request (what a LoRA run serves);
   order base, LoRA, LoRA, base; each `reps` calls after a warm-up, in a child process of its own.
3. whole runs (`--steps N`, 0 skips): `duet train` on the same data, reward and batch shape, synchronous,
   the same seed: full at learner.lr=1e-5 (docs/real-model.md's command) and LoRA at `--lora-lr`
   (default 1e-4: adapters are trained at about 10× the full-weight rate, the usual practice). From their
   metrics: bytes per weight update (`sync/bytes`), broadcast time (`time/broadcast_s`, the engine's load
   of what arrived included), generation seconds per generated token, and the reward curve per step.

Writes benchmarks/results/lora.json: lora_step_ratio and lora_memory_ratio (1), lora_generate_ratio (2),
lora_update_bytes_ratio and lora_broadcast_ratio (3; medians after `--warmup` steps), each LoRA ÷ full,
the reward curves, the machine, the date and the command. `*_fixed_mmap_threshold`: the learner figures
of (1) again (full, then LoRA, `reps` steps each) with MALLOC_MMAP_THRESHOLD_=65536, where the peak RSS
follows the live tensors instead of glibc's heap fragmentation. Goals (issue 26): lora_memory_ratio < 1,
lora_update_bytes_ratio ≤ 0.1. `--quick`: 1 rep, 3 steps; writes lora_quick.json.
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
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository first (see benchmarks/real_model.py)

from benchmarks.common import RESULTS, provenance  # noqa: E402
from benchmarks.real_model import RAY_WORKER_NICE, _load_avg, learner_steps, run_child, vllm_prompts  # noqa: E402

GOALS = {"lora_memory_ratio_max": 1.0, "lora_update_bytes_ratio_max": 0.1}
MMAP_THRESHOLD_VAR, MMAP_THRESHOLD_BYTES = "MALLOC_MMAP_THRESHOLD_", 65536
GIB = 1 << 30


# ---------------------------------------------------------------- child: vLLM generation, with or without LoRA
def child_generate(args: argparse.Namespace) -> dict:
    """reps + 1 calls of vLLM's offline generate (the first a warm-up), every completion max_tokens long;
    with `--lora-rank R`: enable_lora as RolloutEngine sets it and a random rank-R adapter on every request."""
    prompts = vllm_prompts(args)
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    lora_args, request = {}, None
    tmp = tempfile.TemporaryDirectory(prefix="duet-lora-bench-")
    if args.lora_rank:
        from peft import get_peft_model
        from vllm.lora.request import LoRARequest

        from learner.lora import ENGINE_LORA_ID, ENGINE_LORA_NAME, peft_config, targets_of

        torch.manual_seed(0)
        targets = targets_of(args.model, args.lora_rank, None)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        # init_lora_weights=False: B random too, so the adapter changes every layer's output (a served
        # adapter after training, not the identity a fresh one is)
        config = peft_config(args.lora_rank, 2.0 * args.lora_rank, 0.0, targets, args.model)
        config.init_lora_weights = False
        get_peft_model(base, config).save_pretrained(tmp.name)
        del base
        lora_args = {"enable_lora": True, "max_lora_rank": args.lora_rank, "max_loras": 1, "max_cpu_loras": 1}
        request = LoRARequest(ENGINE_LORA_NAME, ENGINE_LORA_ID, tmp.name)
    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=max(len(p["prompt_token_ids"]) for p in prompts) + args.max_tokens + 8,
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
        **lora_args,
    )
    params = SamplingParams(
        temperature=1.0, top_p=1.0, top_k=0, max_tokens=args.max_tokens, min_tokens=args.max_tokens
    )
    times, tokens = [], 0
    for _ in range(args.reps + 1):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=request)
        times.append(time.perf_counter() - t)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    tmp.cleanup()
    return {"generate_s_all": times[1:], "completion_tokens": tokens, "load_avg": _load_avg()}


def run_generate(args: argparse.Namespace, lora_rank: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--data", args.data]
    cmd += ["--prompts", str(args.prompts), "--group-size", str(args.group_size)]
    cmd += ["--max-tokens", str(args.max_tokens), "--reps", str(args.reps), "--threads", str(args.threads)]
    cmd += ["--lora-rank", str(lora_rank)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, preexec_fn=lambda: os.nice(RAY_WORKER_NICE)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"generation child (lora rank {lora_rank}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- whole runs
def whole_run(args: argparse.Namespace, root: Path, name: str, extra: list[str]) -> dict:
    """One synchronous `duet train` run of args.steps steps; its per-step figures."""
    import ray

    from cluster.config import load_config
    from cluster.driver import Trainer
    from cluster.metrics import read_metrics
    from cluster.runtime import init_ray

    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = load_config(
        overrides=[
            f"model.path={args.model}",
            f"data.path={args.data}",
            "rewards.verifier=custom",
            "rewards.custom_function=learner.smollm2:first_number_is_answer",
            f"rollout.group_size={args.group_size}",
            f"rollout.prompts_per_step={args.prompts}",
            f"rollout.max_tokens={args.max_tokens}",
            f"train.steps={args.steps}",
            "train.max_staleness_versions=0",
            "run.seed=0",
            "control.enabled=false",
            "checkpoint.final=false",
            "run.progress=false",
            "run.ray_metrics=false",
            f"run.run_dir={run_dir}",
            *extra,
        ]
    )
    init_ray(cfg)
    t0 = time.perf_counter()
    try:
        Trainer(cfg, run_dir).run()
    finally:
        ray.shutdown()
    metrics = read_metrics(run_dir)
    keys = ("step", "reward/mean", "sync/bytes", "time/step_s", "time/generate_s", "time/train_s")
    keys += ("time/broadcast_s", "tokens/generated", "train/logprob_gap", "sync/checksum_match")
    return {"overrides": extra, "total_s": time.perf_counter() - t0, "per_step": [
        {k: m.get(k) for k in keys} for m in metrics
    ]}  # fmt: skip


def summarize(learner: dict, fixed: dict, generation: dict, runs: dict, warmup: int) -> dict:
    """The ratios (LoRA ÷ full) and the per-arm figures from the raw measurements."""

    def steps(arm: str) -> list[float]:
        return [t for r in learner[arm] for t in r["step_s"]]

    def gens(arm: str) -> list[float]:
        return [t for r in generation[arm] for t in r["generate_s_all"]]

    peak = {arm: max(r["peak_rss_gib"] for r in learner[arm]) for arm in learner}
    whole = {}
    if all("per_step" in runs.get(arm, {}) for arm in ("full", "lora")):
        for arm in ("full", "lora"):
            per_step = runs[arm]["per_step"]
            # A step whose pairs all tied trains nothing and sends nothing: its broadcast and train times
            # are 0, so those medians are over the steps that sent an update.
            sent = [m for m in per_step if m["step"] > warmup and m.get("sync/bytes")]
            later = [m for m in per_step if m["step"] > warmup and m.get("tokens/generated")]
            whole[arm] = {
                "update_bytes": statistics.median(m["sync/bytes"] for m in per_step if m.get("sync/bytes")),
                "broadcast_s": statistics.median(m["time/broadcast_s"] for m in sent) if sent else None,
                "train_s": statistics.median(m["time/train_s"] for m in sent) if sent else None,
                "updates_measured": len(sent),
                "generate_s_per_token": statistics.median(
                    m["time/generate_s"] / m["tokens/generated"] for m in later
                ),
                "step_s": statistics.median(m["time/step_s"] for m in later),
                "reward_curve": [m["reward/mean"] for m in per_step],
            }

    def ratio(key: str) -> float | None:
        if not whole or not whole["full"][key] or whole["lora"][key] is None:
            return None
        return whole["lora"][key] / whole["full"][key]

    memory_ratio = peak["lora"] / peak["full"]
    return {
        "lora_step_ratio": statistics.median(steps("lora")) / statistics.median(steps("full")),
        "lora_memory_ratio": memory_ratio,
        "lora_memory_ratio_fixed_mmap_threshold": fixed["lora"]["peak_rss_gib"]
        / fixed["full"]["peak_rss_gib"],
        "lora_step_ratio_fixed_mmap_threshold": statistics.median(fixed["lora"]["step_s"])
        / statistics.median(fixed["full"]["step_s"]),
        "lora_update_bytes_ratio": ratio("update_bytes"),
        "lora_broadcast_ratio": ratio("broadcast_s"),
        "lora_generate_ratio": statistics.median(gens("lora")) / statistics.median(gens("full")),
        "lora_generate_per_token_ratio_in_runs": ratio("generate_s_per_token"),
        "goals": {
            **GOALS,
            "met": {
                "lora_memory_ratio": memory_ratio < GOALS["lora_memory_ratio_max"],
                "lora_update_bytes_ratio": ratio("update_bytes") is not None
                and ratio("update_bytes") <= GOALS["lora_update_bytes_ratio_max"],
            },
        },
        "learner": {
            arm: {
                "step_s_median": statistics.median(steps(arm)),
                "peak_rss_gib": peak[arm],
                "runs": learner[arm],
            }
            for arm in learner
        },
        "generation": {
            arm: {"generate_s_median": statistics.median(gens(arm)), "runs": generation[arm]}
            for arm in generation
        },
        "whole_runs": whole,
    }


def resummarize(path: Path) -> dict:
    """A results file's summary computed again from its raw measurements (after a change to `summarize`)."""
    r = json.loads(path.read_text())
    fixed = {arm: r["learner_fixed_mmap_threshold"][arm] for arm in ("full", "lora")}
    learner = {arm: r["learner"][arm]["runs"] for arm in r["learner"]}
    generation = {arm: r["generation"][arm]["runs"] for arm in r["generation"]}
    r.update(summarize(learner, fixed, generation, r["runs"], r["settings"]["warmup"]))
    r["summarized_again"] = "python benchmarks/lora.py --summarize " + str(path.relative_to(ROOT))
    return r


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/duet-rl/smollm2"))
    ap.add_argument(
        "--data", default="sums.jsonl", help="JSONL of chat-rendered sums (learner.smollm2 --data)"
    )
    ap.add_argument("--rank", type=int, default=16, help="learner.lora.rank of the LoRA arm")
    ap.add_argument("--lora-lr", type=float, default=1e-4, help="learner.lr of the LoRA arm's whole run")
    ap.add_argument("--prompts", type=int, default=16, help="rollout.prompts_per_step")
    ap.add_argument("--group-size", type=int, default=2, help="rollout.group_size")
    ap.add_argument("--max-tokens", type=int, default=32, help="rollout.max_tokens")
    ap.add_argument(
        "--reps", type=int, default=3, help="timed learner steps / generate calls, after a warm-up"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the learner and of generation")
    ap.add_argument("--steps", type=int, default=10, help="steps of each whole run (0: skip them)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of a whole run left out of medians")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help="1 rep, 3 steps")
    ap.add_argument(
        "--summarize", metavar="FILE", help="compute a results file's ratios again from its raw data"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lora-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child_generate(args)))
        return 0
    if args.summarize:
        path = Path(args.summarize).resolve()
        results = resummarize(path)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: v for k, v in results.items() if k.startswith("lora_")}))
        return 0
    if args.quick:
        args.reps, args.steps, args.warmup = 1, 3, 1
    if args.steps and args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup (or 0)")
    if not (Path(args.model) / "config.json").exists():
        ap.error(f"--model {args.model}: no config.json (build it: python -m learner.smollm2 --out DIR)")
    started, load_before = datetime.now(timezone.utc), _load_avg()
    lora = (f"learner.lora.rank={args.rank}",)
    with tempfile.TemporaryDirectory(prefix="duet-lora-") as tmp:
        # (1) the learner on one batch
        batch_path = Path(tmp) / "batch.json"
        sampler = argparse.Namespace(**vars(args), completions="sampled")
        sampler.reps = 1  # the batch only (one timed call after the warm-up)
        run_child(sampler, "generate", batch_path)
        batch = json.loads(batch_path.read_text())
        learner: dict[str, list[dict]] = {"full": [], "lora": []}
        for arm in ("full", "lora", "lora", "full"):
            learner[arm].append(learner_steps(args, batch, lora if arm == "lora" else ()))
            print(f"learner {arm}: {learner[arm][-1]['step_s']} s, "
                  f"peak {learner[arm][-1]['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
        # The same again with glibc's mmap threshold fixed (the Ray workers of a local Ray inherit the
        # variable): freed activations go back to the system at once instead of staying in malloc's heap,
        # so the peak RSS follows the live tensors rather than how the heap fragmented.
        fixed: dict[str, dict] = {}
        os.environ[MMAP_THRESHOLD_VAR] = str(MMAP_THRESHOLD_BYTES)
        try:
            for arm in ("full", "lora"):
                fixed[arm] = learner_steps(args, batch, lora if arm == "lora" else ())
                print(f"learner {arm}, {MMAP_THRESHOLD_VAR}={MMAP_THRESHOLD_BYTES}: {fixed[arm]['step_s']} s, "
                      f"peak {fixed[arm]['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
        finally:
            del os.environ[MMAP_THRESHOLD_VAR]
        # (2) generation, the same tokens
        generation: dict[str, list[dict]] = {"full": [], "lora": []}
        for arm in ("full", "lora", "lora", "full"):
            generation[arm].append(run_generate(args, args.rank if arm == "lora" else 0))
            print(f"generate {arm}: {generation[arm][-1]['generate_s_all']} s", flush=True)
        # (3) whole runs
        runs: dict[str, dict] = {}
        if args.steps:
            arms = {"full": ["learner.lr=1e-5"], "lora": ["learner.lr=" + repr(args.lora_lr), *lora]}
            for name, extra in arms.items():
                try:
                    runs[name] = whole_run(args, Path(tmp), name, extra)
                except Exception as e:  # the figures of (1) and (2) still get written
                    traceback.print_exc()
                    runs[name] = {"error": f"{type(e).__name__}: {e}", "overrides": extra}
                print(f"run {name}: {runs[name].get('total_s', 'failed')}", flush=True)

    results = {
        "benchmark": "lora",
        **summarize(learner, fixed, generation, runs, args.warmup),
        "learner_fixed_mmap_threshold": {"env": {MMAP_THRESHOLD_VAR: MMAP_THRESHOLD_BYTES}, **fixed},
        "runs": runs,
        "settings": {
            "model": f"{args.model} (SmolLM2-135M-Instruct, fp32)",
            "lora_rank": args.rank,
            "lora_alpha": 2.0 * args.rank,
            "lora_lr": args.lora_lr,
            "full_lr": 1e-5,
            "prompts": args.prompts,
            "group_size": args.group_size,
            "max_tokens": args.max_tokens,
            "sequences": len(batch),
            "completion_tokens": sum(len(b["completion_ids"]) for b in batch),
            "threads": args.threads,
            "reps": args.reps,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        **provenance("lora.py", argv, started, load_before),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("lora_quick.json" if args.quick else "lora.json")
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.startswith("lora_")}))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The learner's step at a real model's size against a plain PyTorch step on the same batch.

    python benchmarks/real_model.py [--model DIR] [--data sums.jsonl] [--reps 3] [--threads 2] [--quick]

SmolLM2-135M-Instruct (fp32; build it with `python -m learner.smollm2`, see docs/real-model.md), the
batch of `duet train ... rollout.group_size=2 rollout.prompts_per_step=16 rollout.max_tokens=32`:
16 chat-rendered sums × 2 completions of 32 tokens. In one run, on the same machine:

1. generation references (child processes), both in every run, each `reps` times after a warm-up: transformers'
   `generate` of the 32 completions (sampling at temperature 1, up to max_tokens; each completion ends at
   its first end-of-sequence token, kept, as vLLM returns it), and vLLM's offline `LLM.generate` of the
   same prompts on the engine's CPU settings. transformers' tokens are the batch of 2 and 3. The faster of
   the two (medians) is the single-process reference's generation. `--completions max` forces every
   completion to max_tokens instead (the heaviest batch of that shape; writes real_model_max_tokens.json).
2. plain step (a fresh child process, run before and after 3): one forward of the same right-padded
   sequences, the LM head on the completion positions only, log-softmax and gather, a policy-gradient
   loss, backward, gradient-norm clip 1.0, torch.optim.AdamW; as many threads as the learner, and at
   the learner's niceness (Ray runs its workers at nice 15; the children of 1 and 2 run at 15 too).
3. learner step: duet-rl's LearnerGroup on a Ray placement group (one DeepSpeed rank, ZeRO and optimizer
   as `duet train` configures them), `train_step` on the same groups, timed around the call as the
   driver's time/train_s is. `--learner-variant 'KEY=VALUE ...'` (repeatable) times more learners with
   those config overrides (e.g. learner.zero_stage=0), each in its own process, between the two plain runs.

Each is timed `reps` times after one warm-up step. Peak memory: each process's peak RSS (the plain
child's ru_maxrss, the learner rank's VmHWM), model load included in both. FLOP/s: the model's matmul
FLOPs of a step (3 × forward: the layers on every padded position, attention scores, the head on the
completion positions) ÷ the step's median time, against the machine's measured fp32 matmul peak
(torch.mm of 2048² at the same thread count, best of a few seconds).

4. whole steps (`--steps N`, 0 skips): `duet train`'s Trainer on the same model, data, reward and batch
   shape (algorithm.filter_tied=false: every group is trained, as in the single-process reference),
   synchronous, then asynchronous with k = 1 (engine bound to core 0, learner pinned to core 1); the
   median time/step_s after `--warmup` steps, and its split (time/generate_s, time/train_s,
   time/broadcast_s), at duet-rl's defaults (learner.zero_stage from the rank count: 0 here;
   cluster.weight_transport=auto: shared memory to the engine on the learner's node). The references of 1
   run again after these runs (before and after bracket duet-rl's); the single-process reference step is
   the faster generation (1) + the plain step (2).

Writes benchmarks/results/real_model.json: learner_plain_ratio (learner median ÷ plain median),
learner_memory_ratio (peak RSS ratio), sync_step_ratio and async_step_ratio (whole step ÷ the
single-process step; null without `--steps`), the FLOP/s figures, the generation reference, the machine
(with its load average: the machine is shared), date and command. Goals (issue 13): learner_plain_ratio
≤ 1.2, learner_memory_ratio ≤ 1.5, sync_step_ratio ≤ 1.0, async_step_ratio ≤ 0.8. `--quick`: 1 rep, no
whole steps; writes real_model_quick.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

from benchmarks.common import RESULTS, provenance  # noqa: E402

GOALS = {
    "learner_plain_ratio_max": 1.2,
    "learner_memory_ratio_max": 1.5,
    "sync_step_ratio_max": 1.0,
    "async_step_ratio_max": 0.8,
}
GIB = 1 << 30
# Ray starts its worker processes (the learner rank among them) at nice 15. On a machine that other work
# shares, a nice-0 reference would get a larger share of the cores than the learner: the children run at
# the same niceness, and the learner's actual niceness is recorded.
RAY_WORKER_NICE = 15


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- child: generation reference
def child_generate(args: argparse.Namespace) -> dict:
    """transformers' generate of prompts × group_size completions (`args.completions`: "sampled", cut after
    the first end-of-sequence token, or "max", all max_tokens long); writes the batch (prompt ids,
    completion ids, the sampler's log-probs) to args.batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    if len(rows) < args.prompts:
        raise SystemExit(f"{args.data}: {len(rows)} rows, --prompts asks for {args.prompts}")
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = [r["problem"] for r in rows[: args.prompts] for _ in range(args.group_size)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    times = []
    for _ in range(args.reps + 1):  # the first is the warm-up; the batch is the last one's
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens if args.completions == "max" else 0,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id,
            )
        times.append(time.perf_counter() - t0)
    generate_s = statistics.median(times[1:])
    width = enc["input_ids"].shape[1]
    logps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    batch = []
    for i in range(len(texts)):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        completion = out.sequences[i, width:].tolist()
        if tok.eos_token_id in completion:  # the rest is padding after the sequence ended
            completion = completion[: completion.index(tok.eos_token_id) + 1]
        batch.append(
            {
                "prompt_index": i // args.group_size,
                "prompt_ids": prompt,
                "completion_ids": completion,
                "logprobs": logps[i][: len(completion)].tolist(),
            }
        )
    Path(args.batch).write_text(json.dumps(batch))
    return {
        "generate_s": generate_s,
        "generate_s_all": times[1:],
        "sequences": len(batch),
        "completion_tokens": sum(len(b["completion_ids"]) for b in batch),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


def vllm_prompts(args: argparse.Namespace) -> list[dict]:
    """The engine's CPU settings put in this process's environment (its threads on the reference's cores),
    then `args.prompts` rows of `args.data`, each `args.group_size` times, as token-id prompts for vLLM."""
    from cluster.placement import cpu_engine_env

    os.environ.update(cpu_engine_env(f"0-{args.threads - 1}" if args.threads > 1 else "0"))
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(args.model)
    return [
        {"prompt_token_ids": tok(r["problem"], add_special_tokens=False)["input_ids"]}
        for r in rows[: args.prompts]
        for _ in range(args.group_size)
    ]


def child_generate_vllm(args: argparse.Namespace) -> dict:
    """vLLM's offline generation (`vllm.LLM`, the engine duet-rl's RolloutEngine runs, on the same CPU
    settings: its threads on the reference's cores, 1 GiB of KV cache, the worker in the engine's process)
    of the same prompts × group_size completions, sampled at temperature 1 up to max_tokens; reps + 1
    calls, the first a warm-up. Writes nothing: the batch of the other references is transformers'."""
    prompts = vllm_prompts(args)
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=max(len(p["prompt_token_ids"]) for p in prompts) + args.max_tokens + 8,
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
    )
    load_s = time.perf_counter() - t0
    params = SamplingParams(
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_tokens=args.max_tokens,
        min_tokens=args.max_tokens if args.completions == "max" else 0,
        logprobs=0,
    )
    times, tokens = [], 0
    for _ in range(args.reps + 1):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "generate_s": statistics.median(times[1:]),
        "generate_s_all": times[1:],
        "sequences": len(prompts),
        "completion_tokens": tokens,
        "load_s": load_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


# ---------------------------------------------------------------- child: plain PyTorch step
def matmul_peak_flops(seconds: float) -> float:
    """Best fp32 FLOP/s of torch.mm on 2048² matrices over `seconds` (the threads set by the caller)."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def child_plain(args: argparse.Namespace) -> dict:
    """reps + 1 plain steps on the batch (the first is the warm-up), in this fresh process."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = json.loads(Path(args.batch).read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
    prompts = [b["prompt_ids"] for b in batch]
    comps = [b["completion_ids"] for b in batch]
    seqs = [p + c for p, c in zip(prompts, comps)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        for j, token in enumerate(c):  # position len(p) - 1 + j predicts completion token j
            rows.append(i)
            cols.append(len(p) - 1 + j)
            targets.append(token)
    rows_t, cols_t, targets_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)
    adv = torch.tensor([1.0 if (i % 2 == 0) else -1.0 for i in rows], dtype=torch.float32)
    times = []
    for _ in range(args.reps + 1):
        t = time.perf_counter()
        hidden = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden[rows_t, cols_t])
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets_t.unsqueeze(-1)).squeeze(-1)
        loss = -(adv * logp).sum() / len(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {
        "step_s": times[1:],
        "warmup_s": times[0],
        "padded_width": width,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "nice": os.nice(0),
        "matmul_peak_flops": matmul_peak_flops(3.0),
        "load_avg": _load_avg(),
    }


def run_child(args: argparse.Namespace, role: str, batch: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        role,
        "--batch",
        str(batch),
        "--model",
        args.model,
        "--data",
        args.data,
        "--prompts",
        str(args.prompts),
        "--group-size",
        str(args.group_size),
        "--max-tokens",
        str(args.max_tokens),
        "--completions",
        args.completions,
        "--reps",
        str(args.reps),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, preexec_fn=lambda: os.nice(RAY_WORKER_NICE)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{role} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the learner
def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def _peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"no VmHWM for process {pid}")


def learner_steps(args: argparse.Namespace, batch: list[dict], overrides: tuple[str, ...] = ()) -> dict:
    """reps + 1 `LearnerGroup.train_step` calls on the batch (the first is the warm-up); `overrides`: config
    overrides of this learner (a variant)."""
    import ray
    from ray.util.placement_group import placement_group

    from cluster.config import load_config
    from cluster.records import Completion, Prompt, ScoredGroup
    from cluster.runtime import resolve_lora_targets
    from learner.group import LearnerGroup

    cfg = load_config(
        overrides=[
            f"model.path={args.model}",
            f"rollout.group_size={args.group_size}",
            f"rollout.prompts_per_step={args.prompts}",
            f"rollout.max_tokens={args.max_tokens}",
            "learner.lr=1e-5",
            *overrides,
        ]
    )
    resolve_lora_targets(cfg, args.model)  # a LoRA variant: its target layers, as `duet train` resolves them
    groups = []
    for g in range(args.prompts):
        rows = [b for b in batch if b["prompt_index"] == g]
        comps = [
            Completion(g, b["prompt_ids"], b["completion_ids"], b["logprobs"], "", "length", 0, 0)
            for b in rows
        ]
        rewards = [1.0 if i % 2 == 0 else 0.0 for i in range(len(rows))]  # every group has a signal
        groups.append(ScoredGroup(Prompt(g, "", ""), comps, rewards, ["x"] * len(rows)))
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), log_to_driver=False)
    try:
        pg = placement_group([{"CPU": 1}], strategy="PACK")
        ray.get(pg.ready(), timeout=120)
        t0 = time.perf_counter()
        learner = LearnerGroup(cfg, args.model, pg, "cpu", args.threads)
        startup_s = time.perf_counter() - t0
        pid = learner.pids()[0]
        times, rank_times = [], []
        for _ in range(args.reps + 1):
            t = time.perf_counter()
            stats = learner.train_step(groups)
            times.append(time.perf_counter() - t)
            rank_times.append(stats["time/train_rank_s"])
        peak = _peak_rss_gib(pid)
        return {
            "step_s": times[1:],
            "warmup_s": times[0],
            "rank_step_s": rank_times[1:],
            "startup_s": startup_s,
            "peak_rss_gib": peak,
            "nice": _nice(pid),
            "overrides": list(overrides),
            "zero_stage": cfg.learner.zero_stage,
            "micro_batch_size": cfg.learner.micro_batch_size,
            "logprob_chunk_tokens": cfg.learner.logprob_chunk_tokens,
            "load_avg": _load_avg(),
        }
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- whole steps of `duet train`
def whole_steps(args: argparse.Namespace, root: Path) -> dict:
    """Trainer runs of `args.steps` steps, sync then async k = 1; medians after `args.warmup` steps."""
    import ray

    from cluster.config import load_config
    from cluster.driver import Trainer
    from cluster.metrics import read_metrics
    from cluster.runtime import init_ray

    common = [
        f"model.path={args.model}",
        f"data.path={args.data}",
        "rewards.verifier=custom",
        "rewards.custom_function=learner.smollm2:first_number_is_answer",
        f"rollout.group_size={args.group_size}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.max_tokens={args.max_tokens}",
        "learner.lr=1e-5",
        "algorithm.filter_tied=false",  # every group trained, as the single-process reference does
        f"train.steps={args.steps}",
        "control.enabled=false",
        "checkpoint.final=false",
        "run.progress=false",
        "run.ray_metrics=false",
    ]
    modes = {
        "sync": ["train.max_staleness_versions=0"],
        # the engine and the learner at once: each on its own core, as benchmarks/pipeline.py runs them
        "async k=1": [
            "train.max_staleness_versions=1",
            "rollout.cpu_threads_bind='0'",
            "learner.cpu_affinity='1'",
        ],
    }
    out: dict = {}
    try:
        for name, extra in modes.items():
            run_dir = root / name.replace(" ", "_").replace("=", "")
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg = load_config(overrides=[*common, *extra, f"run.run_dir={run_dir}"])
            init_ray(cfg)
            t0 = time.perf_counter()
            try:
                Trainer(cfg, run_dir).run()
            except Exception as e:  # the learner/plain figures above still get written
                traceback.print_exc()
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            metrics = [m for m in read_metrics(run_dir) if m["step"] > args.warmup]

            def med(key: str, metrics: list[dict] = metrics) -> float:
                return statistics.median(m.get(key, 0.0) for m in metrics)

            out[name] = {
                "step_s_median": med("time/step_s"),
                "generate_s_median": med("time/generate_s"),
                "train_s_median": med("time/train_s"),
                "broadcast_s_median": med("time/broadcast_s"),
                "wait_data_s_median": med("time/wait_data_s"),
                "measured_steps": len(metrics),
                "per_step": [
                    {
                        k: m.get(k)
                        for k in (
                            "step",
                            "time/step_s",
                            "time/generate_s",
                            "time/train_s",
                            "time/broadcast_s",
                        )
                    }
                    for m in metrics
                ],
                "queue": metrics[-1].get("queue") if metrics else None,
                "overrides": extra,
                "total_s": time.perf_counter() - t0,
                "load_avg": _load_avg(),
            }
            print(f"{name}: step {out[name]['step_s_median']:.2f} s (median of {len(metrics)})", flush=True)
    finally:
        ray.shutdown()
    return out


# ---------------------------------------------------------------- FLOPs of a step
def step_flops(model_dir: str, batch: list[dict], width: int) -> float:
    """Matmul FLOPs of one training step: 3 × forward (backward ≈ 2 × forward)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", h // 64)
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter  # q, k+v, o, mlp
    tokens = len(batch) * width  # every padded position goes through the layers
    completion = sum(len(b["completion_ids"]) for b in batch)
    forward = 2 * layers * per_layer * tokens
    forward += layers * len(batch) * 4 * width * width * heads * hd  # QKᵀ and AV
    forward += 2 * h * cfg["vocab_size"] * completion  # the head, completion positions only
    return 3.0 * forward


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/duet-rl/smollm2"))
    ap.add_argument(
        "--data", default="sums.jsonl", help="JSONL of chat-rendered sums (learner.smollm2 --data)"
    )
    ap.add_argument("--prompts", type=int, default=16, help="rollout.prompts_per_step")
    ap.add_argument("--group-size", type=int, default=2, help="rollout.group_size")
    ap.add_argument("--max-tokens", type=int, default=32, help="rollout.max_tokens (the longest completion)")
    ap.add_argument(
        "--completions",
        choices=("sampled", "max"),
        default="sampled",
        help="sampled: each ends at its end-of-sequence token (as in a run); max: all max_tokens long",
    )
    ap.add_argument("--reps", type=int, default=5, help="timed steps of each, after one warm-up step")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the learner and the plain step")
    ap.add_argument("--steps", type=int, default=7, help="steps of each whole-step run (0: skip them)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of a whole-step run left out")
    ap.add_argument(
        "--learner-variant",
        action="append",
        default=[],
        help="also time a learner with these config overrides (space-separated), e.g. 'learner.zero_stage=0'",
    )
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help="1 timed step of each")
    ap.add_argument("--child", choices=("generate", "generate_vllm", "plain"), help=argparse.SUPPRESS)
    ap.add_argument("--batch", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        fn = {"generate": child_generate, "generate_vllm": child_generate_vllm, "plain": child_plain}[
            args.child
        ]
        print(json.dumps(fn(args)))
        return 0
    if args.quick:
        args.reps, args.steps = 1, 0
    if args.steps and args.steps <= args.warmup:
        ap.error("--steps must be larger than --warmup (or 0)")
    if not (Path(args.model) / "config.json").exists():
        ap.error(f"--model {args.model}: no config.json (build it: python -m learner.smollm2 --out DIR)")
    started, load_before = datetime.now(timezone.utc), _load_avg()
    with tempfile.TemporaryDirectory(prefix="duet-real-model-") as tmp:
        batch_path = Path(tmp) / "batch.json"
        gen = run_child(args, "generate", batch_path)
        print(f"generate (transformers): {gen['generate_s']:.2f} s", flush=True)
        gen_vllm = run_child(args, "generate_vllm", batch_path)
        print(f"generate (vLLM offline): {gen_vllm['generate_s']:.2f} s", flush=True)
        plain_before = run_child(args, "plain", batch_path)
        print(
            f"plain step: {plain_before['step_s']} s, peak {plain_before['peak_rss_gib']:.2f} GiB", flush=True
        )
        batch = json.loads(batch_path.read_text())
        learner = learner_steps(args, batch)
        print(f"learner step: {learner['step_s']} s, peak {learner['peak_rss_gib']:.2f} GiB", flush=True)
        variants = {}
        for spec in args.learner_variant:
            try:
                variants[spec] = learner_steps(args, batch, tuple(spec.split()))
                print(f"learner step, {spec}: {variants[spec]['step_s']} s", flush=True)
            except Exception as e:  # a variant that fails leaves the main figures
                traceback.print_exc()
                variants[spec] = {"error": f"{type(e).__name__}: {e}"}
        plain_after = run_child(args, "plain", batch_path)
        print(f"plain step again: {plain_after['step_s']} s", flush=True)
        runs = whole_steps(args, Path(tmp)) if args.steps else {}
        # The references again after duet-rl's runs: a drift of the machine's speed shows as a difference.
        after = Path(tmp) / "batch_after.json"
        gen_after = run_child(args, "generate", after) if args.steps else None
        gen_vllm_after = run_child(args, "generate_vllm", after) if args.steps else None
    hf_all = gen["generate_s_all"] + (gen_after["generate_s_all"] if gen_after else [])
    vllm_all = gen_vllm["generate_s_all"] + (gen_vllm_after["generate_s_all"] if gen_vllm_after else [])
    generate_refs = {"transformers": statistics.median(hf_all), "vllm_offline": statistics.median(vllm_all)}
    generate_by = min(generate_refs, key=generate_refs.get)  # the faster of the two is the reference
    plain_s = statistics.median(plain_before["step_s"] + plain_after["step_s"])
    learner_s = statistics.median(learner["step_s"])
    plain_peak = max(plain_before["peak_rss_gib"], plain_after["peak_rss_gib"])
    flops = step_flops(args.model, batch, plain_before["padded_width"])
    peak_flops = max(plain_before["matmul_peak_flops"], plain_after["matmul_peak_flops"])
    single = generate_refs[generate_by] + plain_s
    sync = runs["sync"]["step_s_median"] / single if "step_s_median" in runs.get("sync", {}) else None
    asyn = (
        runs["async k=1"]["step_s_median"] / single if "step_s_median" in runs.get("async k=1", {}) else None
    )
    met = {
        "learner_plain_ratio": learner_s / plain_s <= GOALS["learner_plain_ratio_max"],
        "learner_memory_ratio": learner["peak_rss_gib"] / plain_peak <= GOALS["learner_memory_ratio_max"],
    }
    if sync is not None:
        met["sync_step_ratio"] = sync <= GOALS["sync_step_ratio_max"]
    if asyn is not None:
        met["async_step_ratio"] = asyn <= GOALS["async_step_ratio_max"]
    results = {
        "benchmark": "real_model",
        "learner_plain_ratio": learner_s / plain_s,
        "learner_memory_ratio": learner["peak_rss_gib"] / plain_peak,
        "sync_step_ratio": sync,
        "async_step_ratio": asyn,
        "goals": {**GOALS, "met": met},
        "learner_step_s_median": learner_s,
        "plain_step_s_median": plain_s,
        "learner_peak_rss_gib": learner["peak_rss_gib"],
        "plain_peak_rss_gib": plain_peak,
        "step_flops": flops,
        "learner_flops_per_s": flops / learner_s,
        "plain_flops_per_s": flops / plain_s,
        "matmul_peak_flops_per_s": peak_flops,
        "learner_peak_fraction": flops / learner_s / peak_flops,
        "plain_peak_fraction": flops / plain_s / peak_flops,
        "generate_reference_s": generate_refs[generate_by],
        "generate_reference_by": generate_by,
        "generate_references_s": generate_refs,
        "single_process_step_s": single,
        "step_split": runs,
        "generation": {
            "transformers": {"before": gen, "after": gen_after},
            "vllm_offline": {"before": gen_vllm, "after": gen_vllm_after},
        },
        "plain": {"before_learner": plain_before, "after_learner": plain_after},
        "learner": learner,
        "learner_variants": {
            spec: {**v, "plain_ratio": statistics.median(v["step_s"]) / plain_s} if "step_s" in v else v
            for spec, v in variants.items()
        },
        "settings": {
            "model": f"{args.model} (SmolLM2-135M-Instruct, fp32)",
            "sequences": len(batch),
            "prompts": args.prompts,
            "group_size": args.group_size,
            "completions": args.completions,
            "max_tokens": args.max_tokens,
            "completion_tokens": sum(len(b["completion_ids"]) for b in batch),
            "padded_width": plain_before["padded_width"],
            "threads": args.threads,
            "reps": args.reps,
            "plain_step": "model.model forward on the right-padded batch, lm_head on the completion "
            "positions only, log_softmax + gather, loss -(adv·logp).sum()/B, backward, clip_grad_norm_ 1.0, "
            "torch.optim.AdamW(lr 1e-5), zero_grad(set_to_none)",
            "learner_step": "LearnerGroup.train_step (build_rows, Ray call, DeepSpeed engine forward with "
            "the CompletionHead, GRPO loss, backward, step), timed around the call",
        },
        **provenance("real_model.py", argv, started, load_before),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (
        "real_model" + ("_max_tokens" if args.completions == "max" else "") + ("_quick" if args.quick else "")
    )
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: results[k]
                for k in (
                    "learner_plain_ratio",
                    "learner_memory_ratio",
                    "sync_step_ratio",
                    "async_step_ratio",
                )
            }
        )
    )
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of one learner micro-batch at a real vocabulary size: old vs new log-prob computation.

One forward + the GRPO loss + backward on a tiny Llama whose vocabulary is Qwen2.5's 151,936 tokens, at
micro-batch 2 × 2,048 tokens (fp32, CPU), the way LearnerWorker.train_step does it:
- old: `learner.logprobs.reference_logprobs`, the learner's previous code (full-vocabulary logits at every
  position, a stacked copy of the completion positions, entropy with gradient);
- new: `learner.logprobs.completion_logprobs` with the `CompletionHead` (completion positions only, in
  chunks of `learner.logprob_chunk_tokens`, checkpointed; entropy without gradient).
Each variant runs in a fresh process (peak RSS is a per-process high-water mark), new first. The old one
can need over 10 GiB: each child caps its address space below the memory available at start, so on a
small machine it fails with an allocation error instead of waking the OOM killer.
With `--device cuda` the measure is the GPU's: torch.cuda.max_memory_allocated over the step (the model's
own memory excluded), at the shipped 1.5B config's micro-batch of 8 unless --batch says otherwise.

    python benchmarks/learner_memory.py                 # writes benchmarks/results/learner_memory.json
    python benchmarks/learner_memory.py --device cuda   # writes benchmarks/results/learner_memory_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def _rss_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def child(args: argparse.Namespace) -> dict:
    """One variant, one micro-batch, in this process; prints a JSON line."""
    if args.cap_gib and args.device == "cpu":
        cap = int(args.cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.logprobs import completion_logprobs, install_completion_head, reference_logprobs
    from learner.losses import policy_loss
    from learner.tiny_model import ARCH

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = {**ARCH, "max_position_embeddings": args.seq}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, tie_word_embeddings=False, **arch)).float()
    cuda = args.device == "cuda"
    model.to(args.device)
    head = install_completion_head(model, args.chunk) if args.variant == "new" else None
    g = torch.Generator().manual_seed(1)
    completion = args.seq - args.prompt
    prompts = [torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    comps = [torch.randint(0, args.vocab, (completion,), generator=g).tolist() for _ in range(args.batch)]
    mask = torch.ones((args.batch, completion))
    adv = torch.tensor([1.0, -0.5] * (args.batch // 2) + [0.5] * (args.batch % 2))
    mask, adv = mask.to(args.device), adv.to(args.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / GIB if cuda else _rss_peak_gib()

    t0 = time.perf_counter()
    if head is None:
        logp, entropy = reference_logprobs(model, prompts, comps, args.temperature, args.device)
    else:
        logp, entropy = completion_logprobs(model, head, prompts, comps, args.temperature, args.device)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()
    mean_entropy = float((entropy.detach() * mask).sum() / mask.sum())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    grad_sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else _rss_peak_gib()
    return {
        "variant": args.variant,
        "peak_rss_gib" if not cuda else "peak_cuda_allocated_gib": round(peak, 3),
        "before_step_rss_gib" if not cuda else "before_step_cuda_allocated_gib": round(baseline, 3),
        "step_increase_gib": round(peak - baseline, 3),
        "seconds": round(seconds, 2),
        "loss": loss.item(),
        "grad_norm": grad_sq**0.5,
        "mean_entropy": mean_entropy,
    }


def _device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"


def run_variant(variant: str, args: argparse.Namespace, cap_gib: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--cap-gib", f"{cap_gib:.2f}"]
    for flag in ("batch", "seq", "prompt", "vocab", "chunk", "threads", "temperature", "device"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "variant": variant,
            "error": f"exit {proc.returncode}: {' | '.join(tail)}",
            "cap_gib": cap_gib,
        }
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--batch", type=int, help="sequences in the micro-batch (default: 2 on cpu, 8 on cuda)"
    )
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen2.5's)")
    parser.add_argument("--chunk", type=int, default=512, help="learner.logprob_chunk_tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per variant")
    parser.add_argument("--out", help="default: benchmarks/results/learner_memory[_cuda].json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--cap-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.device == "cuda" else 2)
    suffix = "_cuda" if args.device == "cuda" else ""
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"learner_memory{suffix}.json")
    if not 0 < args.prompt < args.seq:
        parser.error(f"--prompt must be between 1 and --seq - 1 ({args.seq - 1}), got {args.prompt}")
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return

    results = {}
    for variant in ("new", "old"):
        cap = max(_available_gib() - 1.5, 1.0)  # leave the rest of the machine its memory
        results[variant] = run_variant(variant, args, cap)
        print(json.dumps(results[variant]), flush=True)
    new, old = results["new"], results["old"]
    peak = "peak_cuda_allocated_gib" if args.device == "cuda" else "peak_rss_gib"
    summary: dict = {}
    if "error" not in new and "error" not in old:
        summary = {
            "peak_ratio_new_over_old": round(new[peak] / old[peak], 4),
            "step_increase_ratio_new_over_old": round(new["step_increase_gib"] / old["step_increase_gib"], 4),
            "loss_abs_diff": abs(new["loss"] - old["loss"]),
            "grad_norm_rel_diff": abs(new["grad_norm"] - old["grad_norm"]) / old["grad_norm"],
            "goal_new_at_most_quarter_of_old": new[peak] <= old[peak] / 4,
        }
    record = {
        "benchmark": "learner_memory",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        },
        "shape": {
            "micro_batch": args.batch,
            "tokens_per_sequence": args.seq,
            "prompt_tokens": args.prompt,
            "completion_tokens": args.seq - args.prompt,
            "vocab": args.vocab,
            "chunk_tokens": args.chunk,
            "dtype": "float32",
            "model": "tiny Llama (learner/tiny_model.py ARCH: hidden 128, 2 layers) with the vocabulary above",
        },
        "device": _device_name(args.device),
        "measure": (
            "peak RSS of a fresh process (ru_maxrss) over model build + one forward, loss, backward"
            if args.device == "cpu"
            else "torch.cuda.max_memory_allocated over one forward, loss, backward, in a fresh process"
        ),
        "results": results,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

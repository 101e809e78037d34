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

With `--mode zero3-host` (issue 22) the measure is a node's host memory under a multi-rank ZeRO-3 learner:
`--ranks` LearnerRank processes (no Ray; a gloo group, the CPU accelerator) on `--model` go through the
learner's life: load, DeepSpeed initialisation, one train_step, the Hugging Face export. The node's total is
the sum over the ranks of each one's proportional set size (PSS: a page shared by k processes counts 1/k to
each, so the sum is what the node holds) above its own after its imports, sampled every 20 ms; its peak
over time is compared between `before` (the learner as it was: every rank loads the whole model on the host,
and every rank builds a full state dict at export) and `after` (the model loaded through DeepSpeed's
zero.Init, already partitioned; the export gathered and written shard by shard by rank 0), in the same run.
Its figures go into learner_memory.json beside the others (`zero3_host_peak_ratio` = after ÷ before).

    python benchmarks/learner_memory.py                 # writes benchmarks/results/learner_memory.json
    python benchmarks/learner_memory.py --device cuda   # writes benchmarks/results/learner_memory_cuda.json
    python benchmarks/learner_memory.py --mode zero3-host --model /work/cache/smollm2   # adds zero3_host_*
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


# ---- --mode zero3-host: a node's host memory under a multi-rank ZeRO-3 learner ----
PHASES = ("imports", "load", "init", "step", "export", "done")


def _pss_kib(pid: int, field: str = "Pss") -> int | None:
    """The process's proportional set size (KiB; `field` Pss_Anon or Pss_File for its parts), or None once
    it has exited."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def zero3_rank(args: argparse.Namespace) -> None:
    """One rank of --mode zero3-host, in this process: says `phase NAME` on stdout as it goes, and waits on
    stdin after its imports until the parent has taken its baseline."""
    # Every module a rank uses, imported before its baseline is taken.
    import deepspeed
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.integrations.deepspeed  # noqa: F401

    from cluster.config import Config
    from learner.rank import LearnerRank

    class BeforeRank(LearnerRank):
        """The learner before issue 22 (commit 5fd2299), kept here as the baseline: the whole model loaded
        on the host by every rank, before the process group exists; at export every rank builds the full
        state dict (under ZeRO-3 by gathers), and rank 0 hands it to save_pretrained."""

        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            if self.model is None:
                self._load_policy()

        def export_hf(self, directory: str, tokenizer_from: str) -> None:
            from transformers import AutoTokenizer

            state = {}
            for name, p in self.engine.module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    state[name] = p.data.clone().detach().to("cpu").clone()
            if self.rank != 0:
                return
            self.engine.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
            AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)

    def phase(name: str) -> None:
        print(f"phase {name}", flush=True)

    def capped(config: dict) -> dict:
        """Both variants: DeepSpeed's ZeRO-3 working buffers at --zero3-buffer-elems elements: the reduce
        bucket (5e8 by default: 2 GB of fp32 per rank), the prefetch bucket and the parameters kept gathered
        (1e9 by default: the whole model on every rank during the step). On a GPU node they are GPU memory;
        on the CPU accelerator they are host memory common to both variants, larger than all the change is
        about."""
        zero = config["zero_optimization"]
        zero["reduce_bucket_size"] = args.zero3_buffer_elems
        zero["stage3_prefetch_bucket_size"] = args.zero3_buffer_elems
        zero["stage3_max_live_parameters"] = args.zero3_buffer_elems
        zero["stage3_max_reuse_distance"] = args.zero3_buffer_elems
        return config

    phase("imports")
    sys.stdin.readline()  # the parent's baseline is taken
    cfg = Config.model_validate({
        "model": {"dtype": args.dtype},
        "learner": {"zero_stage": 3, "num_ranks": args.ranks, "micro_batch_size": 2, "lr": 1e-5},
    })  # fmt: skip
    base = BeforeRank if args.variant == "before" else LearnerRank

    class Rank(base):
        def deepspeed_config(self) -> dict:
            return capped(super().deepspeed_config())

    phase("load")
    rank = Rank(args.zero3_rank, args.ranks, cfg, args.model, "cpu", 1)
    if args.zero3_rank == 0:
        rank.store = torch.distributed.TCPStore("127.0.0.1", args.port, args.ranks, is_master=True,
                                                wait_for_workers=False)  # fmt: skip
    phase("init")
    rank.join("127.0.0.1", args.port, timeout_s=900)
    phase("step")
    g = torch.Generator().manual_seed(100 + args.zero3_rank)
    vocab = rank.engine.module.config.vocab_size
    rows = [
        {
            "prompt_ids": torch.randint(3, vocab, (32,), generator=g).tolist(),
            "completion_ids": torch.randint(3, vocab, (32,), generator=g).tolist(),
            "behaviour_logprobs": [-5.0] * 32,
            "advantage": [1.0, -1.0][i % 2],
            "keep": True,
        }
        for i in range(2)
    ]
    rank.train_step(rows, float(2 * args.ranks), 1)
    phase("export")
    rank.export_hf(os.path.join(args.out, f"export-{args.variant}"), args.model)
    torch.distributed.barrier()
    phase("done")
    torch.distributed.destroy_process_group()


def run_zero3_variant(variant: str, args: argparse.Namespace, work: Path) -> dict:
    """Start the ranks of one variant, sample their PSS every 20 ms until they exit; the node's peak."""
    import socket
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "DS_ACCELERATOR": "cpu",
    }
    procs = []
    for r in range(args.ranks):
        cmd = [sys.executable, __file__, "--zero3-rank", str(r), "--variant", variant, "--ranks", str(args.ranks),
               "--port", str(port), "--model", args.model, "--out", str(work)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, env=env))  # fmt: skip
    phases = ["start"] * args.ranks
    baselines: list[int | None] = [None] * args.ranks
    anon_base = [0] * args.ranks
    seen = threading.Event()

    phase_start: list[dict] = [{} for _ in range(args.ranks)]  # rank -> phase -> PSS growth when it began

    def follow(r: int) -> None:
        for line in procs[r].stdout:
            if line.startswith("phase "):
                phases[r] = line.split()[1]
                now = _pss_kib(procs[r].pid)
                if baselines[r] is not None and now is not None:
                    anon = (_pss_kib(procs[r].pid, "Pss_Anon") or 0) - anon_base[r]
                    phase_start[r][phases[r]] = [
                        round((now - baselines[r]) / (1 << 20), 3),
                        round(anon / (1 << 20), 3),
                    ]
                if phases[r] == "imports":
                    anon_base[r] = _pss_kib(procs[r].pid, "Pss_Anon") or 0
                    baselines[r] = _pss_kib(procs[r].pid)
                    procs[r].stdin.write("go\n")
                    procs[r].stdin.flush()
                seen.set()

    readers = [threading.Thread(target=follow, args=(r,), daemon=True) for r in range(args.ranks)]
    for t in readers:
        t.start()
    t0 = time.monotonic()
    peak, at_peak, by_phase = 0, None, {}
    samples = []
    while any(p.poll() is None for p in procs):
        if time.monotonic() - t0 > args.timeout_s:
            for p in procs:
                p.kill()
            raise RuntimeError(f"{variant}: the ranks did not finish within {args.timeout_s:.0f} s")
        if all(b is not None for b in baselines):
            now = [_pss_kib(p.pid) for p in procs]
            total = sum(max(0, n - b) for n, b in zip(now, baselines) if n is not None)
            clock = phases[0]  # rank 0's phase names the moment
            by_phase[clock] = max(by_phase.get(clock, 0), total)
            samples.append((round(time.monotonic() - t0, 2), total))
            if total > peak:
                peak, at_peak = total, list(phases)
        time.sleep(0.02)
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"{variant}: rank exit codes {codes} (phases reached: {phases})")
    kib = 1 << 20  # KiB in a GiB
    return {
        "variant": variant,
        "node_peak_gib": round(peak / kib, 3),
        "phases_at_peak": at_peak,
        "node_peak_gib_by_phase_of_rank0": {k: round(v / kib, 3) for k, v in by_phase.items()},
        "rank_growth_gib_when_phase_began": phase_start,
        "seconds": round(time.monotonic() - t0, 1),
        "samples": len(samples),
    }


def zero3_host(args: argparse.Namespace) -> None:
    import tempfile

    from safetensors.torch import load_file

    model_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="duet-zero3-host-") as tmp:
        work = Path(tmp)
        for variant in ("before", "after"):
            results[variant] = run_zero3_variant(variant, args, work)
            print(json.dumps(results[variant]), flush=True)

        def weights(variant: str) -> dict:
            out = {}
            for f in sorted((work / f"export-{variant}").glob("*.safetensors")):
                out.update(load_file(f))
            return out

        a, b = weights("before"), weights("after")
        same_keys = a.keys() == b.keys()
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if same_keys else float("inf")
        files_after = sorted(p.name for p in (work / "export-after").iterdir())
    ratio = results["after"]["node_peak_gib"] / results["before"]["node_peak_gib"]
    load = os.getloadavg()
    record = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    record["zero3_host_peak_ratio"] = round(ratio, 4)
    record["zero3_host"] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "model_file_gib": round(model_bytes / GIB, 3),
        "ranks": args.ranks,
        "zero_stage": 3,
        "dtype": args.dtype,
        "torch_threads_per_rank": 1,
        "zero3_buffer_elems": args.zero3_buffer_elems,
        "measure": "peak over time of the sum over ranks of PSS above each rank's PSS after its imports "
        "(/proc/PID/smaps_rollup every 20 ms), through load, DeepSpeed init, one train_step, export_hf",
        "load_avg_at_end": [round(x, 2) for x in load],
        "cpu_count": os.cpu_count(),
        "results": results,
        "exports_equal": same_keys and diff == 0.0,
        "export_max_abs_diff": diff,
        "export_files_after": files_after,
        "goal_ratio_at_most_0_6": ratio <= 0.6,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(
        json.dumps(
            {
                "zero3_host_peak_ratio": record["zero3_host_peak_ratio"],
                "exports_equal": record["zero3_host"]["exports_equal"],
            }
        )
    )


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
    parser.add_argument("--mode", choices=["logprobs", "zero3-host"], default="logprobs")
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
    parser.add_argument("--model", default="/work/cache/smollm2", help="zero3-host: the HF model folder")
    parser.add_argument("--ranks", type=int, default=4, help="zero3-host: learner ranks")
    parser.add_argument("--dtype", default="float32", help="zero3-host: model.dtype")
    parser.add_argument(
        "--zero3-buffer-elems",
        type=int,
        default=10_000_000,
        help="zero3-host: DeepSpeed's ZeRO-3 reduce and prefetch buckets and live parameters, in elements "
        "(both variants)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero3-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["old", "new", "before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--cap-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zero3_rank is not None:
        zero3_rank(args)
        return
    if args.mode == "zero3-host":
        args.out = args.out or str(REPO / "benchmarks" / "results" / "learner_memory.json")
        zero3_host(args)
        return
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

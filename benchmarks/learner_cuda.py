"""The learner's step on a GPU against a plain PyTorch step on the same batch (issue 13's learner figure,
on CUDA). Needs torch with CUDA, DeepSpeed and transformers; neither Ray nor vLLM: it drives
`learner.rank.LearnerRank`, the class each LearnerWorker actor runs.

    python benchmarks/learner_cuda.py [--seqs 64] [--prompt 256] [--completion 512] [--micro-batch 16]

Model: SmolLM2-135M's architecture (30 layers, hidden 576, vocabulary 49,152) with random weights, fp32,
built here (offline). Batch: `--seqs` sequences of `--prompt` + `--completion` random tokens (completion
lengths spread over [completion/2, completion]), advantages ±1, in micro-batches of `--micro-batch`.
In one run, each in a fresh process, `--reps` timed steps after one warm-up:
- plain (run first and last): the same right-padded forward per micro-batch, the LM head on the
  completion positions only, log-softmax and gather, the policy-gradient loss, backward; then gradient
  clip 1.0 and torch.optim.AdamW (what DeepSpeed's `torch_adam` runs);
- learner at ZeRO 0, 2 and 3: `LearnerRank.train_step` on the rows the driver would send, NCCL backend,
  world size 1 (one GPU). Timed with torch.cuda.synchronize around the call.
Peak GPU memory: torch.cuda.max_memory_allocated over the process (model and optimizer included).
Writes benchmarks/results/learner_cuda.json: per variant the median step, the ratio to the plain median
(goal, issue 13: learner ≤ 1.2 × plain) and the peak-memory ratio (goal ≤ 1.5), machine, date, command.
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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import provenance  # noqa: E402  (the repository on sys.path first)

GIB = 1 << 30
SMOLLM2_135M = {  # config.json of HuggingFaceTB/SmolLM2-135M-Instruct, the fields that shape the compute
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_initialized() else 0.0


def batch_rows(args: argparse.Namespace) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = SMOLLM2_135M["vocab_size"]
    rows = []
    for i in range(args.seqs):
        n = int(torch.randint(args.completion // 2, args.completion + 1, (1,), generator=g))
        comp = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({
            "prompt_ids": torch.randint(3, vocab, (args.prompt,), generator=g).tolist(),
            "completion_ids": comp,
            "behaviour_logprobs": [-10.0] * n,
            "advantage": 1.0 if i % 2 == 0 else -1.0,
            "keep": True,
        })  # fmt: skip
    return rows


def child_plain(args: argparse.Namespace, model_dir: str) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dev = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    rows = batch_rows(args)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0)
    micro = []
    for k in range(0, len(rows), args.micro_batch):
        chunk = rows[k : k + args.micro_batch]
        width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        sel_r, sel_c, targets, adv, seq_w = [], [], [], [], []
        for i, r in enumerate(chunk):
            p, c = r["prompt_ids"], r["completion_ids"]
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attn[i, : len(p) + len(c)] = 1
            sel_r += [i] * len(c)
            sel_c += range(len(p) - 1, len(p) - 1 + len(c))
            targets += c
            adv += [r["advantage"]] * len(c)
            seq_w += [1.0 / len(c)] * len(c)  # seq-mean-token-mean: each sequence's tokens weigh 1/len
        t = lambda xs, dt=torch.long: torch.tensor(xs, dtype=dt, device=dev)  # noqa: E731
        micro.append((ids.to(dev), attn.to(dev), t(sel_r), t(sel_c), t(targets), t(adv, torch.float32),
                      t(seq_w, torch.float32)))  # fmt: skip
    times = []
    for _ in range(args.reps + 1):
        _sync()
        t0 = time.perf_counter()
        for ids, attn, sr, sc, tg, adv, w in micro:
            hidden = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden[sr, sc])
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tg.unsqueeze(-1)).squeeze(-1)
            ratio = torch.exp(logp - logp.detach())
            loss = -(adv * ratio * w).sum() / len(rows)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
    return {"step_s": times[1:], "warmup_s": times[0], "peak_gib": _peak_gib()}


def child_learner(args: argparse.Namespace, model_dir: str, stage: int) -> dict:
    import torch

    from cluster.config import Config
    from learner.rank import LearnerRank

    cfg = Config.model_validate({
        "model": {"dtype": "float32"},
        "learner": {"zero_stage": stage, "micro_batch_size": args.micro_batch, "lr": 1e-6},
    })  # fmt: skip
    rank = LearnerRank(0, 1, cfg, model_dir, args.device, None)
    rank.store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    rank.join("127.0.0.1", rank.store.port, timeout_s=120)
    rows = batch_rows(args)
    n_micro = -(-len(rows) // args.micro_batch)
    times = []
    for _ in range(args.reps + 1):
        _sync()
        t0 = time.perf_counter()
        stats = rank.train_step(rows, float(len(rows)), n_micro)
        _sync()
        times.append(time.perf_counter() - t0)
    torch.distributed.destroy_process_group()
    return {
        "step_s": times[1:],
        "warmup_s": times[0],
        "peak_gib": _peak_gib(),
        "grad_norm": stats["train/grad_norm"],
    }


def run_child(args: argparse.Namespace, model_dir: str, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model-dir", model_dir]
    for flag in ("seqs", "prompt", "completion", "micro_batch", "reps", "device"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    out = json.loads(lines[-1])
    out["median_s"] = statistics.median(out["step_s"])
    print(f"{variant}: median {out['median_s']:.3f} s, peak {out['peak_gib']:.2f} GiB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--completion", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the script")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per variant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learner_cuda.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "plain":
            result = child_plain(args, args.model_dir)
        else:
            result = child_learner(args, args.model_dir, int(args.child.removeprefix("zero")))
        print(json.dumps(result), flush=True)
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("learner_cuda: torch sees no CUDA GPU; this benchmark runs on a GPU machine")
    started, load_before = datetime.now(timezone.utc), [round(x, 2) for x in os.getloadavg()]
    model_dir = tempfile.mkdtemp(prefix="duet-learner-cuda-")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(model_dir)
    results = {v: run_child(args, model_dir, v) for v in ("plain", "zero0", "zero2", "zero3")}
    results["plain_again"] = run_child(args, model_dir, "plain")
    plains = [r for r in (results["plain"], results["plain_again"]) if "error" not in r]
    summary: dict = {}
    if plains:
        plain_s = statistics.median([t for r in plains for t in r["step_s"]])
        plain_peak = max(r["peak_gib"] for r in plains)
        summary["plain_median_s"] = plain_s
        for v in ("zero0", "zero2", "zero3"):
            if "error" not in results[v]:
                summary[f"{v}_over_plain"] = round(results[v]["median_s"] / plain_s, 3)
                if plain_peak > 0:  # 0 in a CPU dry run
                    summary[f"{v}_memory_over_plain"] = round(results[v]["peak_gib"] / plain_peak, 3)
    record = {"benchmark": "learner_cuda", **provenance("learner_cuda.py", None, started, load_before)}
    if args.device == "cuda":
        record["machine"]["gpu"] = (
            f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    record |= {
        "shape": {
            "model": "SmolLM2-135M architecture, random weights, fp32",
            "seqs": args.seqs,
            "prompt_tokens": args.prompt,
            "completion_tokens": f"{args.completion // 2}..{args.completion}",
            "micro_batch": args.micro_batch,
            "reps": args.reps,
        },
        "goals": {"learner_over_plain_max": 1.2, "memory_over_plain_max": 1.5},
        "results": results,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""The learner half of scripts/gpu-smoke.sh (`--learner-only`): needs torch with CUDA, DeepSpeed,
transformers and duet-rl's `learner` package; neither vLLM nor Ray.

Checks, each printed as a `PASS`/`FAIL` line:
1. DeepSpeed builds a ZeRO-2 engine on cuda:0 with the NCCL backend, around the tiny Llama (built
   here, offline) with duet-rl's completion-only log-prob head installed.
2. Three GRPO steps with duet-rl's own `policy_loss` and `completion_logprobs`: every loss and gradient
   norm finite, the weights change at every step.
3. With 2 or more GPUs: after every step learner (cuda:0) broadcasts every parameter over NCCL to a
   receiver process on cuda:1 (the place of a vLLM engine), in its own process group outside
   DeepSpeed's, as duet-rl's weight sync does; the sha256 of every tensor's bytes must be equal at
   both ends. With one GPU this check is skipped (NCCL refuses two ranks on one GPU), and said so.

Exit status 0 when every check that ran passed. Usage: python scripts/gpu_smoke_learner.py [--steps 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def digests(named: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """sha256 of each tensor's bytes (moved to the CPU), by name."""
    out = {}
    for name, t in named:
        raw = t.detach().contiguous().to("cpu").view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha256(raw).hexdigest()
    return out


def _nccl_group(store_path: str, rank: int):
    import torch.distributed as dist

    store = dist.FileStore(store_path, 2)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timedelta(seconds=120)  # a peer that died must not hang the smoke test
    # Its own group, outside DeepSpeed's default one: the shape of duet-rl's learner -> engine transfer.
    return dist.ProcessGroupNCCL(store, rank, 2, opts), torch.device("cuda", rank)


def receiver(model_dir: str, store_path: str, steps: int, result_path: str) -> None:
    """Stand-in for an engine on cuda:1: receives every parameter after every step, writes digests."""
    from transformers import AutoModelForCausalLM

    torch.cuda.set_device(1)
    pg, device = _nccl_group(store_path, 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device)
    params = list(model.named_parameters())
    lines = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for _, p in params:
                pg.broadcast(p.data, 0).wait()
        torch.cuda.synchronize(device)
        lines += [f"{step}\t{name}\t{d}" for name, d in digests(params).items()]
    Path(result_path).write_text("\n".join(lines) + "\n")


def _check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {what}", flush=True)
    if not ok:
        failures.append(what)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print(
            "gpu-smoke: FAIL  torch sees no CUDA GPU (torch.cuda.is_available() is False, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda})",
            file=sys.stderr,
        )
        return 2
    import deepspeed
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from cluster.config import Config
    from learner.logprobs import completion_logprobs, install_completion_head
    from learner.losses import policy_loss
    from learner.tiny_model import build_model

    n_gpus = torch.cuda.device_count()
    print(
        f"gpu-smoke: {n_gpus} GPU(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), DeepSpeed {deepspeed.__version__}, NCCL {torch.cuda.nccl.version()}",
        flush=True,
    )
    failures: list[str] = []
    cfg = Config()
    work = tempfile.mkdtemp(prefix="duet-gpu-smoke-")
    model_dir = os.path.join(work, "model")
    build_model(model_dir, seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    head = install_completion_head(model, cfg.learner.logprob_chunk_tokens)

    torch.cuda.set_device(0)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    store = dist.FileStore(os.path.join(work, "ds-store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="nccl")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.learner.grad_clip,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 1 << 30,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    _check(
        engine.device.type == "cuda" and dist.get_backend() == "nccl",
        f"DeepSpeed ZeRO-2 engine on {engine.device} with backend {dist.get_backend()}",
        failures,
    )

    pg = proc = None
    result_path = os.path.join(work, "receiver.tsv")
    if n_gpus >= 2:
        ctx = mp.get_context("spawn")
        store_path = os.path.join(work, "transfer-store")
        proc = ctx.Process(target=receiver, args=(model_dir, store_path, args.steps, result_path))
        proc.start()
        pg, _ = _nccl_group(store_path, 0)
    else:
        print("SKIP  NCCL weight broadcast: one GPU (NCCL needs each rank on its own GPU)", flush=True)

    g = torch.Generator().manual_seed(0)
    sent: list[str] = []
    for step in range(1, args.steps + 1):
        before = digests(list(model.named_parameters()))
        prompts = [torch.randint(3, 200, (6,), generator=g).tolist() for _ in range(4)]
        comps = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 3, 7, 2)]
        t0 = time.perf_counter()
        logp, _ = completion_logprobs(engine, head, prompts, comps, 1.0, engine.device)
        mask = torch.zeros_like(logp)
        for i, c in enumerate(comps):
            mask[i, : len(c)] = 1.0
        adv = torch.tensor([1.0, -1.0, 0.5, -0.5], device=engine.device)
        loss, _ = policy_loss(logp, logp.detach() - 0.01, adv, mask, clip_low=0.2, clip_high=0.2)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        after = digests(list(model.named_parameters()))
        changed = sum(before[k] != after[k] for k in after)
        _check(
            bool(torch.isfinite(loss)) and grad_norm == grad_norm and grad_norm > 0 and changed == len(after),
            f"step {step}: loss {float(loss):.5f}, grad norm {grad_norm:.4f}, {changed}/{len(after)} tensors "
            f"changed, {time.perf_counter() - t0:.2f} s",
            failures,
        )
        if pg is not None:
            t0 = time.perf_counter()
            with torch.no_grad():
                for _, p in model.named_parameters():
                    pg.broadcast(p.data, 0).wait()
            torch.cuda.synchronize()
            n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            print(f"      broadcast {n_bytes / 1e6:.1f} MB over NCCL in {time.perf_counter() - t0:.3f} s")
            sent += [f"{step}\t{name}\t{d}" for name, d in after.items()]

    if proc is not None:
        proc.join(timeout=300)
        got = Path(result_path).read_text().splitlines() if Path(result_path).exists() else []
        _check(
            proc.exitcode == 0 and got == sent,
            f"NCCL weight broadcast cuda:0 -> cuda:1: {sum(a == b for a, b in zip(got, sent))}/{len(sent)} "
            f"tensor digests equal at both ends over {args.steps} steps (receiver exit {proc.exitcode})",
            failures,
        )
    dist.destroy_process_group()
    if failures:
        print(f"gpu-smoke learner: {len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("gpu-smoke learner: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

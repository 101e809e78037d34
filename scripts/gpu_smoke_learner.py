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

4. duet-rl's own learner code on CUDA: `learner.rank.LearnerRank` (what each `LearnerWorker` Ray actor
   runs; no Ray here) joins an NCCL group, takes `old_logprobs` and 3 `train_step`s of 2 micro-batches
   under ZeRO 0, 2 and 3 (3 with every parameter partitioned) in fp32, each in a fresh process: the
   weights move at every step, and the three stages' gradient norms and mean log-probs agree within
   1e-4 relative; a DeepSpeed checkpoint saved after step 2 and loaded back redoes step 3 the same;
   one more ZeRO-3 run in bf16 (the dtype of GPU runs), within 1e-2.

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

from learner.tiny_model import VOCAB_SIZE  # noqa: E402  (the repo on sys.path first)


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


def _rank_rows(step: int, n: int = 6) -> list[dict]:
    """A step's rows in the shape the driver sends LearnerWorker.train_step (seeded by the step)."""
    g = torch.Generator().manual_seed(100 + step)
    rows = []
    for i in range(n):
        comp = torch.randint(
            3, VOCAB_SIZE, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g
        ).tolist()
        rows.append({
            "prompt_ids": torch.randint(3, VOCAB_SIZE, (6,), generator=g).tolist(),
            "completion_ids": comp,
            "behaviour_logprobs": [-5.0] * len(comp),
            "advantage": [1.0, -1.0, 0.5, -0.5, 0.25, -0.25][i % 6],
            "keep": True,
        })  # fmt: skip
    return rows


def rank_child(model_dir: str, stage: int, dtype: str, work: str, device: str) -> dict:
    """One LearnerRank (world size 1, NCCL) on cuda:0: 3 steps, a checkpoint after step 2, step 3 redone
    from it. Runs in its own process: DeepSpeed keeps process-wide state between engines."""
    from cluster.config import Config
    from learner.rank import LearnerRank

    cfg = Config.model_validate({
        "model": {"dtype": dtype},
        "learner": {"zero_stage": stage, "micro_batch_size": 4, "zero3_persistence_threshold": 0, "lr": 1e-3},
    })  # fmt: skip
    rank = LearnerRank(0, 1, cfg, model_dir, device, None)
    rank.store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    rank.join("127.0.0.1", rank.store.port, timeout_s=120)
    out: dict = {"device": str(rank.engine.device), "backend": torch.distributed.get_backend(), "steps": []}
    ckpt = os.path.join(work, f"ckpt-zero{stage}-{dtype}")

    def step(rows: list[dict]) -> dict:
        old = rank.old_logprobs(rows, 2)
        assert [len(o) for o in old] == [len(r["completion_ids"]) for r in rows], "old_logprobs lengths"
        units = [len(r["completion_ids"]) if cfg.algorithm.aggregation == "token_mean" else 1 for r in rows]
        stats = rank.train_step(rows, float(sum(units)), 2)
        # The mean log-prob under the weights that start the step: a fingerprint of those weights (the loss
        # is not one: with one update per batch the ratio is 1, so the loss is -mean(advantage)).
        return {
            "old_logprob_mean": sum(map(sum, old)) / sum(map(len, old)),
            **{k: stats[k] for k in ("train/loss", "train/grad_norm", "train/tokens")},
        }

    for k in (1, 2, 3):
        out["steps"].append(step(_rank_rows(k)))
        if k == 2:
            rank.save_checkpoint(ckpt, "step_2", {"step": 2})
    out["checkpoint_step"] = rank.load_checkpoint(ckpt, "step_2").get("step")
    out["redo_step3"] = step(_rank_rows(3))
    torch.distributed.destroy_process_group()
    return out


RANK_VARIANTS = ((0, "float32"), (2, "float32"), (3, "float32"), (3, "bfloat16"))


def check_learner_rank(
    model_dir: str, work: str, failures: list[str], device: str = "cuda", variants=RANK_VARIANTS
) -> None:
    """Check 4 (see the module's docstring): each variant in a fresh process, compared here. `device`
    "cpu" (gloo) is the dry run that tests/test_learner_rank.py makes of this check on CPU machines."""
    import json
    import subprocess

    backend = "nccl" if device == "cuda" else "gloo"
    results = {}
    for stage, dtype in variants:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--rank-child", str(stage), dtype, model_dir, work, device]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        name = f"LearnerRank ZeRO-{stage} {dtype}"
        if proc.returncode != 0 or not lines:
            _check(False, f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}", failures)
            continue
        r = results[(stage, dtype)] = json.loads(lines[-1])
        olds = [s["old_logprob_mean"] for s in r["steps"]]
        norms = [s["train/grad_norm"] for s in r["steps"]]
        finite = all(x == x and abs(x) < 1e6 for x in olds + norms) and all(n > 0 for n in norms)
        moved = len(set(olds)) == len(olds)  # each step starts from other weights
        redo = r["redo_step3"]
        tol = 1e-6 if dtype == "float32" else 1e-2
        same = all(
            abs(redo[k] - r["steps"][2][k]) <= tol * max(1.0, abs(r["steps"][2][k]))
            for k in ("old_logprob_mean", "train/grad_norm")
        )
        _check(
            finite and moved and same and r["checkpoint_step"] == 2 and r["device"].startswith(device)
            and r["backend"] == backend,
            f"{name} on {r['device']} ({r['backend']}): mean log-prob before each step "
            f"{[round(x, 6) for x in olds]}, grad norms {[round(x, 5) for x in norms]}; step 3 redone from "
            f"the step-2 checkpoint: {redo['old_logprob_mean']:.6f}, {redo['train/grad_norm']:.5f} "
            f"({time.perf_counter() - t0:.1f} s)",
            failures,
        )  # fmt: skip
    fp32 = [r for (_, dtype), r in sorted(results.items()) if dtype == "float32"]
    if len(fp32) >= 2:
        ref = fp32[0]["steps"]
        worst = max(
            abs(a[k] - b[k]) / max(abs(b[k]), 1e-8)
            for r in fp32[1:]
            for a, b in zip(r["steps"], ref)
            for k in ("old_logprob_mean", "train/grad_norm")
        )
        _check(
            worst <= 1e-4,
            f"LearnerRank ZeRO {', '.join(str(st) for (st, dt) in sorted(results) if dt == 'float32')} (fp32) "
            f"agree: worst relative difference {worst:.2e}",
            failures,
        )


# ---- 5-7: the learner at Qwen2.5-1.5B's shape, and the GPU's own behaviour (issue 22) ----
# Qwen2.5-1.5B's config.json, the fields that make its shape (random weights: nothing is downloaded).
QWEN25_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}
# The same architecture scaled down to what a CPU test runs in seconds (the dry run of checks 5 and 6).
QWEN2_TINY = {**QWEN25_1_5B, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
GIB = 1 << 30


def build_shaped_model(out_dir: str, config: dict, dtype: str, device: str) -> int:
    """A model of `config`'s shape with random weights, saved as a Hugging Face folder; its parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    cfg.architectures = config.get("architectures")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def _long_rows(n: int, seq: int, prompt: int, vocab: int, seed: int) -> list[dict]:
    """n training rows of `seq` tokens (`prompt` of them the prompt), random ids, mixed-sign advantages."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt_ids": torch.randint(3, vocab, (prompt,), generator=g).tolist(),
            "completion_ids": (c := torch.randint(3, vocab, (seq - prompt,), generator=g).tolist()),
            "behaviour_logprobs": [-5.0] * len(c),
            "advantage": float(torch.randn((), generator=g)),
            "keep": True,
        }
        for _ in range(n)
    ]


def _picks(numel: int, k: int) -> slice:
    """The elements of a flattened gradient that are compared: every (numel // k)-th, at most k."""
    return slice(0, None, max(1, numel // k))


class _ExactSum:
    """Stands in for the DeepSpeed engine inside `LearnerRank.train_step`, to compute the reference: the
    same forward and backward of every micro-batch, on a plain copy of the model (same weights, same
    dtype), each micro-batch's gradient added into float64 (exact for these sums). So the reference and
    DeepSpeed differ only in how the micro-batches' gradients are summed."""

    def __init__(self, model: torch.nn.Module, k: int) -> None:
        self.module, self.k = model, k
        self.sums = {n: None for n, _ in model.named_parameters()}

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def set_gradient_accumulation_boundary(self, _: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                if p.grad is None:
                    continue
                part = p.grad.reshape(-1)[_picks(p.numel(), self.k)][: self.k].double().cpu()
                self.sums[name] = part if self.sums[name] is None else self.sums[name] + part
                p.grad = None

    def step(self) -> None:
        pass

    def get_global_grad_norm(self) -> None:
        return None


def _pack_for_broadcast(params: list[torch.Tensor], side_stream) -> list[torch.Tensor]:
    """The weights' bytes packed into buckets as vLLM's packed NCCL producer packs them: on a stream of its
    own that does not wait for the stream the optimizer step ran on (packed_tensor.py,
    packed_nccl_broadcast_producer). On CPU there are no streams: the same copies, in order."""
    import contextlib

    context = torch.cuda.stream(side_stream) if side_stream is not None else contextlib.nullcontext()
    buckets, current, size = [], [], 0
    with context:
        for t in params:
            current.append(t.detach().reshape(-1).view(torch.uint8))
            size += current[-1].numel()
            if size >= 256 << 20:
                buckets.append(torch.cat(current))
                current, size = [], 0
        if current:
            buckets.append(torch.cat(current))
    return buckets


def accum_child(model_dir: str, accum: str, device: str, micro_batches: int, batch: int, seq: int,
                prompt: int, vocab: int, k: int, out_path: str) -> dict:  # fmt: skip
    """One LearnerRank (world size 1, bf16, ZeRO-2, gradient checkpointing as the shipped configs) takes one
    step of `micro_batches` micro-batches of `batch` × `seq` tokens, summing gradients in `accum` ("float32"
    or "model"). Measured: the summed gradient (sampled elements, read when DeepSpeed's step() begins)
    against the exact sum of each micro-batch's gradient; on CUDA the peak memory of the step; and whether
    the weights read for the broadcast right after the step equal them read after a synchronisation."""
    import copy

    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from cluster.config import Config
    from learner.logprobs import install_completion_head
    from learner.rank import LearnerRank

    cfg = Config.model_validate({
        "model": {"dtype": "bfloat16"},
        "learner": {"zero_stage": 2, "micro_batch_size": batch, "grad_accum_dtype": accum, "lr": 1e-5,
                    "gradient_checkpointing": True},
    })  # fmt: skip
    cuda = device == "cuda"
    rank = LearnerRank(0, 1, cfg, model_dir, device, None)
    rank.store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    rank.join("127.0.0.1", rank.store.port, timeout_s=300)
    rows = _long_rows(micro_batches * batch, seq, prompt, vocab, seed=22)
    denominator = float(len(rows))  # the default aggregation: per sequence
    t0 = time.perf_counter()

    # The reference: the same step's micro-batches on a plain copy, each gradient summed in float64.
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(rank.device)
    plain.gradient_checkpointing_enable()
    exact = _ExactSum(plain, k)
    stand_in = copy.copy(rank)
    stand_in.engine, stand_in.head = exact, install_completion_head(plain, cfg.learner.logprob_chunk_tokens)
    LearnerRank.train_step(stand_in, rows, denominator, micro_batches)
    reference_s = time.perf_counter() - t0
    del plain, stand_in
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    summed: dict[str, torch.Tensor] = {}
    real_step = rank.engine.step

    def step_reading_the_sum(*args, **kwargs):
        for name, p in rank.engine.module.named_parameters():
            full = safe_get_full_grad(p)
            if full is not None:
                summed[name] = full.reshape(-1)[_picks(full.numel(), k)][:k].double().cpu()
        return real_step(*args, **kwargs)

    rank.engine.step = step_reading_the_sum
    t0 = time.perf_counter()
    stats = rank.train_step(rows, denominator, micro_batches)
    # Right after the step, as LearnerWorker.broadcast would: the weights packed for the broadcast.
    params = [p.data for p in rank.engine.module.parameters()]
    read_now = _pack_for_broadcast(params, torch.cuda.Stream() if cuda else None)
    if cuda:
        torch.cuda.synchronize()
    read_synced = _pack_for_broadcast(params, None)
    same = len(read_now) == len(read_synced) and all(torch.equal(a, b) for a, b in zip(read_now, read_synced))
    step_s = time.perf_counter() - t0
    names = [n for n in summed if exact.sums.get(n) is not None]
    got = torch.cat([summed[n] for n in names])
    want = torch.cat([exact.sums[n] for n in names])
    torch.save({n: summed[n] for n in names}, out_path)
    out = {
        "accum": accum,
        "params": sum(p.numel() for p in rank.engine.module.parameters()),
        "micro_batches": micro_batches,
        "tokens_per_micro_batch": batch * seq,
        "grad_norm": stats["train/grad_norm"],
        "rel_error_vs_exact_sum": float((got - want).norm() / want.norm()),
        "compared_elements": int(got.numel()),
        "broadcast_read_equals_synced": same,
        "broadcast_bytes": int(sum(b.numel() for b in read_synced)),
        "reference_s": round(reference_s, 2),
        "step_s": round(step_s, 2),
    }
    if cuda:
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        out["gpu"] = torch.cuda.get_device_name(0)
    torch.distributed.destroy_process_group()
    return out


def check_grad_accumulation(work: str, failures: list[str], device: str = "cuda", shape: dict = QWEN25_1_5B,
                            micro_batches: int = 16, batch: int = 8, seq: int = 4096, prompt: int = 512,
                            k: int = 1 << 16) -> dict:  # fmt: skip
    """Checks 5 and 6 (see the module's docstring): the learner at `shape` in bf16, ZeRO-2, one step of
    `micro_batches` × `batch` × `seq` tokens, once summing gradients in float32 and once in bf16, each in a
    fresh process. `device` "cpu" is the dry run tests/test_gpu_readiness.py makes of it (a small shape)."""
    import json
    import subprocess

    model_dir = os.path.join(work, "shaped-model")
    t0 = time.perf_counter()
    n = build_shaped_model(model_dir, shape, "bfloat16", device)
    print(f"      built a model of the given shape, {n:,} parameters, in {time.perf_counter() - t0:.1f} s")
    results: dict = {}
    procs, outputs = {}, {}
    for accum in ("model", "float32"):
        out_path = os.path.join(work, f"grads-{accum}.pt")
        cmd = [sys.executable, __file__, "--accum-child", model_dir, accum, device, str(micro_batches), str(batch),
               str(seq), str(prompt), str(shape["vocab_size"]), str(k), out_path]  # fmt: skip
        procs[accum] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if device == "cuda":  # one at a time on the GPU: each one's peak memory is its own
            outputs[accum] = procs[accum].communicate(timeout=600)
    for accum, proc in procs.items():  # on CPU both ran side by side
        out, err = outputs[accum] if accum in outputs else proc.communicate(timeout=600)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            _check(False, f"bf16 ZeRO-2 step, accumulation {accum}: exit {proc.returncode}: {err.strip()[-2000:]}",
                   failures)  # fmt: skip
            return results
        results[accum] = json.loads(lines[-1])
    bf16, fp32 = results["model"], results["float32"]
    a = torch.load(os.path.join(work, "grads-float32.pt"))
    b = torch.load(os.path.join(work, "grads-model.pt"))
    names = sorted(set(a) & set(b))
    fa, fb = torch.cat([a[x] for x in names]), torch.cat([b[x] for x in names])
    results["fp32_vs_bf16_rel_diff"] = float((fa - fb).norm() / fa.norm())
    # On CUDA some backward kernels (the embedding's) add in a nondeterministic order: the reference is
    # then not bit-equal per micro-batch, and fp32 summation is judged against bf16's, not against 0.
    exact_enough = fp32["rel_error_vs_exact_sum"] <= (1e-6 if device == "cpu" else 1e-3)
    falls = fp32["rel_error_vs_exact_sum"] * 10 <= bf16["rel_error_vs_exact_sum"]
    peak = f", peak GPU memory {fp32['peak_gpu_gib']} GiB (float32 sums) / {bf16['peak_gpu_gib']} GiB (bf16)" \
        if "peak_gpu_gib" in fp32 else ""  # fmt: skip
    _check(
        exact_enough and falls,
        f"bf16 ZeRO-2 learner, {fp32['params']:,} parameters, {micro_batches} micro-batches of "
        f"{batch} x {seq} tokens: summed gradient vs the exact sum of its micro-batches, relative error "
        f"{bf16['rel_error_vs_exact_sum']:.2e} summing in bf16, {fp32['rel_error_vs_exact_sum']:.2e} in float32; "
        f"float32 vs bf16 sums differ by {results['fp32_vs_bf16_rel_diff']:.2e}{peak}; step "
        f"{fp32['step_s']} s",
        failures,
    )
    _check(
        fp32["broadcast_read_equals_synced"] and bf16["broadcast_read_equals_synced"],
        f"the {fp32['broadcast_bytes'] / 1e6:.0f} MB of weights packed for the broadcast right after step() "
        f"({'on a stream of their own, as vLLM packs them' if device == 'cuda' else 'CPU: no streams'}) equal "
        "them read after a synchronisation",
        failures,
    )
    return results


def hold_gpu(gib: float) -> None:
    """Child of check_gpu_memory_release: take `gib` GiB of GPU memory, say so, wait to be killed."""
    held = torch.empty(int(gib * GIB), dtype=torch.uint8, device="cuda")
    held.fill_(1)
    torch.cuda.synchronize()
    print("holding", flush=True)
    time.sleep(3600)


def check_gpu_memory_release(failures: list[str], gib: float = 16.0, timeout_s: float = 120.0) -> dict:
    """Check 7: how long after a SIGKILL a process's GPU memory is free again (what a replacement engine
    on that GPU waits for). CUDA only; says SKIP elsewhere."""
    import signal
    import subprocess

    if not torch.cuda.is_available():
        print("SKIP  GPU memory after a SIGKILL: CUDA only", flush=True)
        return {}
    free_before, total = torch.cuda.mem_get_info()
    child = subprocess.Popen(
        [sys.executable, __file__, "--hold-gpu", str(gib)], stdout=subprocess.PIPE, text=True
    )
    try:
        if child.stdout.readline().strip() != "holding":
            _check(False, f"GPU memory after a SIGKILL: the child did not take its {gib} GiB", failures)
            return {}
        free_held = torch.cuda.mem_get_info()[0]
        child.send_signal(signal.SIGKILL)
        t0 = time.perf_counter()
        freed_s = None
        while time.perf_counter() - t0 < timeout_s:
            if torch.cuda.mem_get_info()[0] >= free_before - 256 * (1 << 20):
                freed_s = time.perf_counter() - t0
                break
            time.sleep(0.005)
        child.wait(timeout=timeout_s)
        reaped_s = time.perf_counter() - t0
    finally:
        if child.poll() is None:
            child.kill()
    held = (free_before - free_held) / GIB
    _check(
        freed_s is not None,
        f"GPU memory after a SIGKILL: a process holding {held:.1f} GiB of {total / GIB:.0f} GiB; free again "
        + (f"{freed_s:.3f} s after the kill" if freed_s is not None else f"not within {timeout_s:.0f} s")
        + f" (the process reaped after {reaped_s:.3f} s)",
        failures,
    )
    return {"held_gib": held, "freed_s": freed_s, "reaped_s": reaped_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--rank-child",
        nargs=5,
        metavar=("STAGE", "DTYPE", "MODEL_DIR", "WORK", "DEVICE"),
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--accum-child", nargs=10, help=argparse.SUPPRESS)
    ap.add_argument("--hold-gpu", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hold_gpu:
        hold_gpu(args.hold_gpu)
        return 0
    if args.accum_child:
        import json

        model_dir, accum, device, *ints, out_path = args.accum_child
        mb, batch, seq, prompt, vocab, k = map(int, ints)
        print(json.dumps(accum_child(model_dir, accum, device, mb, batch, seq, prompt, vocab, k, out_path)))
        return 0
    if args.rank_child:
        import json

        stage, dtype, model_dir, work, device = args.rank_child
        print(json.dumps(rank_child(model_dir, int(stage), dtype, work, device)), flush=True)
        return 0
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
        prompts = [torch.randint(3, VOCAB_SIZE, (6,), generator=g).tolist() for _ in range(4)]
        comps = [torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist() for n in (5, 3, 7, 2)]
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
    check_learner_rank(model_dir, work, failures)
    check_grad_accumulation(work, failures)
    check_gpu_memory_release(failures)
    if failures:
        print(f"gpu-smoke learner: {len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("gpu-smoke learner: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

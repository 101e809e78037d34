"""LearnerWorker: one Ray actor = one DeepSpeed rank.

It recomputes the log-probs of the sampled tokens under the current policy, applies the GRPO-family
loss from `learner.losses`, steps the DeepSpeed engine (ZeRO 0-3; CPU accelerator + gloo on CPU),
and on rank 0 sends the new weights to the engines through vLLM's weight-transfer API.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch


def _pad(rows: list[list[int]], value: float | int, dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def _parse_cores(spec: str) -> set[int]:
    """'1', '2-3', '0,2-3' → a set of core ids."""
    cores: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


@ray.remote
class LearnerWorker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        model_path: str,
        learner: dict[str, Any],
        algorithm: dict[str, Any],
        temperature: float,
        dtype: str,
        device: str,
        seed: int,
        cpu_threads: int | None = None,
    ) -> None:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK="0",  # one visible device per actor (Ray sets CUDA_VISIBLE_DEVICES)
            WORLD_SIZE=str(world_size),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if learner.get("cpu_affinity"):
                cores = _parse_cores(learner["cpu_affinity"])
                os.sched_setaffinity(0, cores)
                cpu_threads = len(cores)
            if cpu_threads:
                torch.set_num_threads(cpu_threads)
        import deepspeed
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.rank, self.world_size = rank, world_size
        self.learner, self.algo, self.temperature = learner, algorithm, temperature
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
        torch_dtype = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch_dtype)
        if learner["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": learner["grad_clip"],
            "zero_optimization": {"stage": learner["zero_stage"]},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": learner["lr"],
                    "betas": list(learner["betas"]),
                    "weight_decay": learner["weight_decay"],
                    "torch_adam": True,  # DeepSpeed's fused CPU Adam needs a compiler at run time
                },
            },
            "bf16": {"enabled": dtype == "bfloat16"},
            "fp16": {"enabled": dtype == "float16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=ds_config
        )
        self.ref = None
        if algorithm["kl_coef"] > 0:  # β = 0 loads no reference model at all
            self.ref = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch_dtype).to(
                self.device
            )
            self.ref.eval().requires_grad_(False)
        self.sender = None

    def ready(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    # ---- one optimizer step ----
    def _logprobs(self, model, prompt_ids, completion_ids):
        """Per-token log π(completion token | prefix) of the tempered distribution, [B, C] (+ entropy)."""
        from learner.losses import entropy_from_logits, token_logprobs

        seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
        ids = _pad(seqs, 0, torch.long).to(self.device)
        attn = _pad([[1] * len(s) for s in seqs], 0, torch.long).to(self.device)
        logits = model(input_ids=ids, attention_mask=attn).logits.float() / self.temperature
        width = max(len(c) for c in completion_ids)
        rows_logits = []
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            # Logits at position t predict token t+1: the completion is predicted from len(p)-1 on.
            chunk = logits[i, len(p) - 1 : len(p) - 1 + len(c)]
            rows_logits.append(torch.nn.functional.pad(chunk, (0, 0, 0, width - len(c))))
        step_logits = torch.stack(rows_logits)
        targets = _pad(completion_ids, 0, torch.long).to(self.device)
        return token_logprobs(step_logits, targets), entropy_from_logits(step_logits)

    def old_logprobs(self, batch: list[dict], forwards: int = 0) -> list[list[float]]:
        """π_old for `batch` (this rank's sequences): per-token log-probs of each completion under the
        current weights, no grad, in micro-batches. Taken before the first of several updates per batch,
        so later updates see their ratio to the policy that started the step. `forwards`: the most
        micro-batches any rank runs; under ZeRO-3 every forward gathers parameters from all ranks, so a
        rank with fewer runs dummy forwards until it has taken part in as many."""
        mb = self.learner["micro_batch_size"]
        chunks = [batch[i : i + mb] for i in range(0, len(batch), mb)]
        out: list[list[float]] = []
        self.engine.eval()
        with torch.no_grad():
            for chunk in chunks:
                prompts = [s["prompt_ids"] for s in chunk]
                comps = [s["completion_ids"] for s in chunk]
                logp = self._logprobs(self.engine, prompts, comps)[0].float().cpu()
                out.extend(logp[i, : len(c)].tolist() for i, c in enumerate(comps))
            if self.learner["zero_stage"] == 3:
                for _ in range(len(chunks), forwards):
                    self.engine(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device))
        self.engine.train()
        return out

    def train_step(self, batch: list[dict], denominator: float) -> dict[str, float]:
        """`batch`: this rank's sequences; `denominator`: the step's count of loss units over all ranks
        (tokens for token_mean, sequences otherwise), so micro-batches and ranks add up to one loss.
        A row's "old_logprobs" (set when there are several updates per batch) is its π_old; without it
        π_old is the policy that starts the step (one update per batch: ratio 1)."""
        from learner.losses import policy_loss

        t0 = time.perf_counter()
        algo, mb = self.algo, self.learner["micro_batch_size"]
        self.engine.train()
        sums: dict[str, float] = {}
        weight_total = 0.0
        chunks = [batch[i : i + mb] for i in range(0, len(batch), mb)] or [[]]
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1
            self.engine.set_gradient_accumulation_boundary(last)
            if not chunk:
                # A rank with no data still takes part in the gradient reduction, with a zero loss.
                loss = sum(p.sum() * 0.0 for p in self.engine.module.parameters())
                self.engine.backward(loss)
                continue
            prompts = [s["prompt_ids"] for s in chunk]
            comps = [s["completion_ids"] for s in chunk]
            logp, entropy = self._logprobs(self.engine, prompts, comps)
            mask = _pad([[float(s["keep"])] * len(s["completion_ids"]) for s in chunk], 0.0, torch.float32)
            mask = mask.to(self.device)
            behaviour = _pad([s["behaviour_logprobs"] for s in chunk], 0.0, torch.float32).to(self.device)
            adv = torch.tensor([s["advantage"] for s in chunk], dtype=torch.float32, device=self.device)
            if all("old_logprobs" in s for s in chunk):
                old = _pad([s["old_logprobs"] for s in chunk], 0.0, torch.float32).to(self.device)
            else:
                old = logp.detach()  # one update per batch: π_old is the policy that starts the step
            ref = None
            if self.ref is not None:
                with torch.no_grad():
                    ref, _ = self._logprobs(self.ref, prompts, comps)
            loss, stats = policy_loss(
                logp,
                old,
                adv,
                mask,
                clip_low=algo["clip_low"],
                clip_high=algo["clip_high"],
                dual_clip=algo["dual_clip"],
                aggregation=algo["aggregation"],
                length_norm=algo["length_norm"],
                behaviour_logprobs=behaviour,
                tis_cap=algo["tis_cap"],
                ref_logprobs=ref,
                kl_coef=algo["kl_coef"],
                kl_estimator=algo["kl_estimator"],
                denominator=denominator,
            )
            # DeepSpeed averages gradients over ranks; the loss is already a share of the global sum.
            self.engine.backward(loss * self.world_size)
            n_tok = float(mask.sum())
            weight_total += n_tok
            sums["train/entropy"] = sums.get("train/entropy", 0.0) + float((entropy * mask).sum())
            for key in (
                "clip_frac",
                "clip_frac/low",
                "clip_frac/high",
                "clip_frac/dual",
                "logprob_gap",
                "ratio/mean",
                "kl",
                "tis/mean_weight",
            ):
                if key in stats:
                    sums[f"train/{key}"] = sums.get(f"train/{key}", 0.0) + stats[key] * n_tok
            sums["train/loss"] = sums.get("train/loss", 0.0) + float(loss)
        self.engine.step()
        out = {k: (v if k == "train/loss" else v / max(weight_total, 1.0)) for k, v in sums.items()}
        out["train/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        out["train/tokens"] = weight_total
        out["time/train_rank_s"] = time.perf_counter() - t0
        return out

    # ---- weight broadcast (vLLM's trainer-side weight-transfer API) ----
    def init_broadcast(
        self,
        engine_handles: list,
        address: str,
        port: int,
        workers_per_engine: int,
        backend: str,
        bucket_bytes: int,
        timeout_s: float | None = None,
    ) -> None:
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from learner.weight_sender import (
            TRANSFER_TIMEOUT_S,
            EngineFleetClient,
            ZeroModuleSource,
            register_trainer_engine,
        )

        register_trainer_engine()
        self.transfer_timeout_s = timeout_s or TRANSFER_TIMEOUT_S
        client = EngineFleetClient(engine_handles, workers_per_engine, self.transfer_timeout_s)
        world = 1 + len(engine_handles) * workers_per_engine
        source = ZeroModuleSource(self.engine.module, self.learner["zero_stage"])
        if backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(
                master_address=address,
                master_port=port,
                world_size=world,
                rank=self.rank,
                packed_buffer_size_bytes=bucket_bytes,
            )
        else:
            from learner.weight_sender import GlooTrainerInitInfo

            info = GlooTrainerInitInfo(
                master_address=address,
                master_port=port,
                world_size=world,
                rank=self.rank,
                bucket_bytes=bucket_bytes,
                timeout_s=self.transfer_timeout_s,
            )
        self.sender = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)

    def broadcast(self, version: int, checksum: bool = True) -> dict[str, Any]:
        """Send the weights as `version`; `checksum`: hash the bytes at both ends (a checked step)."""
        from learner.weight_sender import send

        return send(self.sender, version, checksum, self.transfer_timeout_s)

    def shutdown_broadcast(self) -> None:
        from learner.weight_sender import close

        close(self.sender)
        self.sender = None

    # ---- state ----
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights in HF names, on CPU (gathered under ZeRO-3). For tests and exports."""
        from learner.weight_sender import ZeroModuleSource

        source = ZeroModuleSource(self.engine.module, self.learner["zero_stage"])
        return {name: t.detach().to("cpu").clone() for name, t in source}

    def perturb(self, scale: float, seed: int) -> None:
        """Add seeded noise to every weight (tests: prove that a broadcast really moves weights)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.engine.module.parameters():
                p.add_(
                    torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype).to(p.device) * scale
                )

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        _, client_state = self.engine.load_checkpoint(directory, tag=tag)
        return client_state or {}

    def export_hf(self, directory: str, tokenizer_from: str) -> None:
        """A Hugging Face folder that transformers and vLLM load as they are (rank 0 writes)."""
        state = self.full_state_dict()
        if self.rank != 0:
            return
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)

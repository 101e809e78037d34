"""LearnerRank: one DeepSpeed rank, the whole of what a `LearnerWorker` actor (learner/worker.py) does.

It recomputes the log-probs of the sampled tokens under the current policy, applies the GRPO-family
loss from `learner.losses`, steps the DeepSpeed engine (ZeRO 0-3; NCCL on CUDA, CPU accelerator + gloo
on CPU), and on rank 0 sends the new weights to the engines through vLLM's weight-transfer API.
A plain class, so that it runs without Ray too: scripts/gpu_smoke_learner.py drives it on a GPU machine
where Ray and vLLM cannot be installed. Only the methods that report the node import Ray.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import torch

from cluster.config import Config


def _pad(rows: list[list[int]], value: float | int, dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def _loss_mask(row: dict) -> list[int]:
    """The row's per-token loss mask (rows built before episodes existed have none: all ones)."""
    mask = row.get("loss_mask")
    if mask is None:
        return [1] * len(row["completion_ids"])
    if len(mask) != len(row["completion_ids"]):
        raise ValueError(f"a row's loss_mask has {len(mask)} entries for {len(row['completion_ids'])} tokens")
    return mask


def _parse_cores(spec: str) -> set[int]:
    """'1', '2-3', '0,2-3' → a set of core ids."""
    cores: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


class LearnerRank:
    """One DeepSpeed rank. Built in two steps so that learner rank 0 itself chooses the rendezvous of
    the process group: `__init__` loads the model (no collectives), rank 0's `open_endpoint` binds the
    store on its own node, then every rank's `join` initialises DeepSpeed against it."""

    def __init__(
        self, rank: int, world_size: int, cfg: Config, model_path: str, device: str, cpu_threads: int | None
    ) -> None:
        learner = cfg.learner
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK="0",  # one visible device per actor (Ray sets CUDA_VISIBLE_DEVICES)
            WORLD_SIZE=str(world_size),
        )
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if learner.cpu_affinity:
                cores = _parse_cores(learner.cpu_affinity)
                os.sched_setaffinity(0, cores)
                cpu_threads = len(cores)
            if cpu_threads:
                torch.set_num_threads(cpu_threads)
        from transformers import AutoModelForCausalLM

        from learner.logprobs import install_completion_head

        torch.manual_seed(cfg.run.seed)
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.learner, self.algo, self.temperature = learner, cfg.algorithm, cfg.rollout.temperature
        self.device_kind = device
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.model_path = model_path
        self.torch_dtype = getattr(torch, cfg.model.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=self.torch_dtype)
        self.head = install_completion_head(self.model, learner.logprob_chunk_tokens)
        if learner.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.store = None
        self.engine = None
        self.ref = None
        self.ref_head = None
        self.sender = None

    def node_address(self) -> str:
        return _node_address()

    def open_endpoint(self, timeout_s: float = 600.0) -> tuple[str, int]:
        """Rank 0: bind the process group's store on this node (a port the OS picks, so nothing can take
        it between choosing and binding) and return (this node's address, that port)."""
        from datetime import timedelta

        if self.rank != 0:
            raise RuntimeError(f"open_endpoint is for learner rank 0, called on rank {self.rank}")
        address = _node_address()
        self.store = torch.distributed.TCPStore(
            address,
            0,
            self.world_size,
            is_master=True,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        return address, self.store.port

    def free_port(self) -> tuple[str, int]:
        """This node's address and a port free on it now (the weight-transfer rendezvous, which the sender
        binds later on this same process)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return _node_address(), s.getsockname()[1]

    def join(self, address: str, port: int, timeout_s: float = 600.0) -> None:
        """Join the process group at rank 0's endpoint and build the DeepSpeed engine (collective)."""
        from datetime import timedelta

        import deepspeed

        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
        backend = "nccl" if self.device_kind == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if self.store is None:
            self.store = torch.distributed.TCPStore(
                address, port, self.world_size, is_master=False, timeout=timeout
            )
        torch.distributed.init_process_group(
            backend, store=self.store, rank=self.rank, world_size=self.world_size, timeout=timeout
        )
        deepspeed.init_distributed(dist_backend=backend)  # adopts the group above
        learner, dtype = self.learner, self.cfg.model.dtype
        zero: dict[str, Any] = {"stage": learner.zero_stage}
        if learner.zero_stage == 3:
            zero["stage3_param_persistence_threshold"] = learner.zero3_persistence_threshold
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": learner.grad_clip,
            "zero_optimization": zero,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": learner.lr,
                    "betas": list(learner.betas),
                    "weight_decay": learner.weight_decay,
                    "torch_adam": True,  # DeepSpeed's fused CPU Adam needs a compiler at run time
                },
            },
            "bf16": {"enabled": dtype == "bfloat16"},
            "fp16": {"enabled": dtype == "float16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, *_ = deepspeed.initialize(
            model=self.model, model_parameters=self.model.parameters(), config=ds_config
        )
        if self.algo.kl_coef > 0:  # β = 0 loads no reference model at all
            from transformers import AutoModelForCausalLM

            from learner.logprobs import install_completion_head

            self.ref = AutoModelForCausalLM.from_pretrained(self.model_path, torch_dtype=self.torch_dtype)
            self.ref_head = install_completion_head(self.ref, learner.logprob_chunk_tokens)
            self.ref.to(self.device).eval().requires_grad_(False)

    def ready(self) -> dict:
        import ray

        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "address": _node_address(),
        }

    # ---- one optimizer step ----
    def _logprobs(self, ref: bool, prompt_ids, completion_ids):
        """Per-token log π(completion token | prefix) of the tempered distribution, [B, C], and entropy."""
        from learner.logprobs import completion_logprobs

        model, head = (self.ref, self.ref_head) if ref else (self.engine, self.head)
        return completion_logprobs(model, head, prompt_ids, completion_ids, self.temperature, self.device)

    def _dummy_logprobs(self):
        """One 2-token sequence through the engine: a rank with fewer micro-batches than the others runs
        these so that every rank takes part in the same collectives (ZeRO-3 gathers parameters in each
        forward and backward, ZeRO-2 reduces gradients in each backward)."""
        return self._logprobs(False, [[0]], [[0]])[0]

    def old_logprobs(self, batch: list[dict], forwards: int = 0) -> list[list[float]]:
        """π_old for `batch` (this rank's sequences): per-token log-probs of each completion under the
        current weights, no grad, in micro-batches. Taken before the first of several updates per batch,
        so later updates see their ratio to the policy that started the step. `forwards`: the most
        micro-batches any rank runs; under ZeRO-3 every forward gathers parameters from all ranks, so a
        rank with fewer runs dummy forwards until it has taken part in as many."""
        mb = self.learner.micro_batch_size
        chunks = [batch[i : i + mb] for i in range(0, len(batch), mb)]
        out: list[list[float]] = []
        self.engine.eval()
        with torch.no_grad():
            for chunk in chunks:
                prompts = [s["prompt_ids"] for s in chunk]
                comps = [s["completion_ids"] for s in chunk]
                logp = self._logprobs(False, prompts, comps)[0].float().cpu()
                out.extend(logp[i, : len(c)].tolist() for i, c in enumerate(comps))
            if self.learner.zero_stage == 3:
                for _ in range(len(chunks), forwards):
                    self._dummy_logprobs()
        self.engine.train()
        return out

    def train_step(self, batch: list[dict], denominator: float, micro_batches: int = 1) -> dict[str, float]:
        """`batch`: this rank's sequences; `denominator`: the step's count of loss units over all ranks
        (tokens for token_mean, sequences otherwise), so micro-batches and ranks add up to one loss;
        `micro_batches`: the most micro-batches any rank has this step. Every rank runs that many
        forward/backward passes (the missing ones on a dummy sequence with zero weight), so gradient
        reductions and ZeRO-3 gathers line up across ranks.
        A row's "old_logprobs" (set when there are several updates per batch) is its π_old; without it
        π_old is the policy that starts the step (one update per batch: ratio 1)."""
        from learner.losses import policy_loss

        t0 = time.perf_counter()
        algo, mb = self.algo, self.learner.micro_batch_size
        self.engine.train()
        sums: dict[str, float] = {}
        weight_total = 0.0
        chunks = [batch[i : i + mb] for i in range(0, len(batch), mb)]
        if len(chunks) > micro_batches:
            raise ValueError(
                f"rank {self.rank}: {len(batch)} rows make {len(chunks)} micro-batches of "
                f"{mb}, more than the step's micro_batches={micro_batches}"
            )
        chunks += [[] for _ in range(max(micro_batches, 1) - len(chunks))]
        for k, chunk in enumerate(chunks):
            self.engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
            if not chunk:
                # Zero weight: the same forward/backward collectives as a real micro-batch, no gradient.
                self.engine.backward(self._dummy_logprobs().sum() * 0.0)
                continue
            prompts = [s["prompt_ids"] for s in chunk]
            comps = [s["completion_ids"] for s in chunk]
            logp, entropy = self._logprobs(False, prompts, comps)
            # Per token: kept row × the row's loss mask (an episode's observation tokens are 0: not the model's).
            mask = _pad([[float(s["keep"]) * m for m in _loss_mask(s)] for s in chunk], 0.0, torch.float32)
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
                    ref, _ = self._logprobs(True, prompts, comps)
            loss, stats = policy_loss(
                logp,
                old,
                adv,
                mask,
                clip_low=algo.clip_low,
                clip_high=algo.clip_high,
                dual_clip=algo.dual_clip,
                aggregation=algo.aggregation,
                length_norm=algo.length_norm,
                behaviour_logprobs=behaviour,
                tis_cap=algo.tis_cap,
                ref_logprobs=ref,
                kl_coef=algo.kl_coef,
                kl_estimator=algo.kl_estimator,
                denominator=denominator,
            )
            # DeepSpeed averages gradients over ranks; the loss is already a share of the global sum.
            self.engine.backward(loss * self.world_size)
            n_tok = float(mask.sum())
            weight_total += n_tok
            sums["train/entropy"] = sums.get("train/entropy", 0.0) + float((entropy * mask).sum())
            for key in (
                "clip_frac/total",
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
        own_norm = None
        if self.learner.zero_stage == 0:
            # DeepSpeed records the norm only where ZeRO or mixed precision clips (its _take_model_step), so
            # at stage 0 in fp32 get_global_grad_norm() is None: take it here, after the last backward's
            # all-reduce, before step() clips and zeroes the gradients.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()
        out = {k: (v if k == "train/loss" else v / max(weight_total, 1.0)) for k, v in sums.items()}
        ds_norm = self.engine.get_global_grad_norm()
        out["train/grad_norm"] = float(ds_norm if ds_norm is not None else own_norm or 0.0)
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
        source = ZeroModuleSource(self.engine.module, self.learner.zero_stage)
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

        source = ZeroModuleSource(self.engine.module, self.learner.zero_stage)
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

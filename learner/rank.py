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
from pathlib import Path
from typing import Any

import torch

from cluster.config import Config
from cluster.placement import parse_cores
from learner.build_locks import orphaned_build_locks_removed

# The size of a shard of the Hugging Face export: the most rank 0 holds while it writes one (export_hf).
EXPORT_SHARD_BYTES = 256 << 20


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
                cores = set(parse_cores(learner.cpu_affinity))
                os.sched_setaffinity(0, cores)
                cpu_threads = len(cores)
            if cpu_threads:
                torch.set_num_threads(cpu_threads)
        torch.manual_seed(cfg.run.seed)
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.learner, self.algo, self.temperature = learner, cfg.algorithm, cfg.rollout.temperature
        self.device_kind = device
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.model_path = model_path
        self.torch_dtype = getattr(torch, cfg.model.dtype)
        self.model = self.head = None
        self.lora = None  # the PEFT LoraConfig when learner.lora.rank > 0: only adapters are trained
        if learner.lora.enabled:
            from learner.lora import peft_config

            lora = learner.lora
            if lora.target_modules is None:
                raise ValueError("learner.lora.target_modules must be resolved before the learner starts")
            self.lora = peft_config(lora.rank, lora.alpha, lora.dropout, lora.target_modules, model_path)
        if learner.zero_stage != 3:
            # Every rank holds the whole model at ZeRO 0-2 anyway: load it now, while the engines load.
            self._load_policy()
        # ZeRO-3: loaded in `join`, once the process group exists, already partitioned (zero.Init).
        self.store = None
        self.engine = None
        self.ref = None
        self.ref_head = None
        self.sender = None

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

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config of this learner (every rank builds the same)."""
        learner, dtype = self.learner, self.cfg.model.dtype
        zero: dict[str, Any] = {"stage": learner.zero_stage}
        if learner.zero_stage == 3:
            zero["stage3_param_persistence_threshold"] = learner.zero3_persistence_threshold
        config: dict[str, Any] = {
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
        if dtype != "float32" and learner.grad_accum_dtype == "float32":
            # A step's micro-batches (16 to 32 in the shipped GPU configs) add their gradients into one
            # buffer; in bf16 every addition rounds to 8 bits of mantissa. DeepSpeed keeps that buffer in
            # this dtype instead: at ZeRO-2/3 its gradient partitions (stage_1_and_2.py, stage3.py), at
            # ZeRO-1 in bf16 its BF16_Optimizer. ZeRO-0 has no such path (the config refuses that mix).
            config["data_types"] = {"grad_accum_dtype": "fp32"}
        return config

    def _load_policy(self, ds_config: dict[str, Any] | None = None) -> None:
        """Load the policy from `model_path`. At ZeRO-3 (`ds_config` given, the process group up) through
        transformers' own ZeRO-3 path: while an `HfDeepSpeedConfig` of this config lives, `from_pretrained`
        builds the model inside `deepspeed.zero.Init` (each parameter partitioned as it is created, so no
        rank ever holds the whole model) and copies the checkpoint in module by module, gathered, on rank
        0 only (transformers/integrations/deepspeed.py, _load_state_dict_into_zero3_model; the other ranks
        map the safetensors file without reading it). The global it sets is cleared right after, so later
        loads (the KL reference model) are plain ones."""
        from transformers import AutoModelForCausalLM

        from learner.logprobs import install_completion_head

        if ds_config is not None and self.learner.zero_stage == 3:
            from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

            keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
            try:
                self.model = AutoModelForCausalLM.from_pretrained(
                    self.model_path, torch_dtype=self.torch_dtype
                )
            finally:
                unset_hf_deepspeed_config()
                del keep_alive
        else:
            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, torch_dtype=self.torch_dtype)
        self.head = install_completion_head(self.model, self.learner.logprob_chunk_tokens)
        if self.learner.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if self.lora is not None:
            from learner.lora import wrap

            if self.learner.gradient_checkpointing:
                # The embeddings are frozen: without this no input of a checkpointed block needs a gradient
                # and the adapters inside it would get none.
                self.model.enable_input_require_grads()
            self.model = wrap(self.model, self.lora)

    def join(self, address: str, port: int, timeout_s: float = 600.0) -> None:
        """Join the process group at rank 0's endpoint and build the DeepSpeed engine (collective); at
        ZeRO-3 load the policy first, partitioned over the group."""
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
        # Loading DeepSpeed's ops can wait forever on a build lock left by a killed process (learner/build_locks.py).
        with orphaned_build_locks_removed():
            deepspeed.init_distributed(dist_backend=backend)  # adopts the group above
        ds_config = self.deepspeed_config()
        if self.model is None:
            self._load_policy(ds_config)
        with orphaned_build_locks_removed():
            trained = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
            self.engine, *_ = deepspeed.initialize(
                model=self.model, model_parameters=trained, config=ds_config
            )
        if self.world_size == 1 and self.learner.zero_stage == 0:
            # DeepSpeed's stage-0 backward flattens every gradient into one buffer, all-reduces it over a
            # group of one and copies it back: three passes over the gradients for nothing (~8 % of the step
            # at 135M on CPU, benchmarks/real_model.py). The same switch its pipeline engine turns off.
            self.engine.enable_backward_allreduce = False
        if self.algo.kl_coef > 0 and self.lora is None:  # β = 0 loads no reference model at all
            from transformers import AutoModelForCausalLM

            from learner.logprobs import install_completion_head

            self.ref = AutoModelForCausalLM.from_pretrained(self.model_path, torch_dtype=self.torch_dtype)
            self.ref_head = install_completion_head(self.ref, self.learner.logprob_chunk_tokens)
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

        if ref and self.lora is not None:
            # The reference of a LoRA run is its base model: the same weights with the adapter switched off.
            with self.engine.module.disable_adapter():
                return completion_logprobs(
                    self.engine, self.head, prompt_ids, completion_ids, self.temperature, self.device
                )
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
            if self.algo.kl_coef > 0:
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
        weight_transport: str = "auto",
    ) -> None:
        """`backend`: duet_host or duet_nccl (actors.weight_receiver); `weight_transport`:
        cluster.weight_transport, how duet_host reaches each engine (actors.weight_transport)."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from actors.weight_receiver import BACKEND_NCCL
        from learner.weight_sender import (
            TRANSFER_TIMEOUT_S,
            DuetHostTrainerInitInfo,
            DuetNCCLTrainerInitInfo,
            EngineFleetClient,
            ZeroModuleSource,
            register_trainer_engine,
        )

        register_trainer_engine()
        self.transfer_timeout_s = timeout_s or TRANSFER_TIMEOUT_S
        source = ZeroModuleSource(
            self.engine.module, self.learner.zero_stage, adapter_only=self.lora is not None
        )
        transports = None
        if backend != BACKEND_NCCL and self.rank == 0:
            transports = self._choose_transports(engine_handles, source, weight_transport)
        client = EngineFleetClient(
            engine_handles, workers_per_engine, self.transfer_timeout_s, transports, self.adapter_config()
        )
        world = 1 + len(engine_handles) * workers_per_engine
        if backend == BACKEND_NCCL:
            info = DuetNCCLTrainerInitInfo(
                master_address=address,
                master_port=port,
                world_size=world,
                rank=self.rank,
                packed_buffer_size_bytes=bucket_bytes,
            )
        else:
            info = DuetHostTrainerInitInfo(
                master_address=address,
                master_port=port,
                world_size=client.group_size(),  # the engines that receive over the network
                rank=self.rank,
                bucket_bytes=bucket_bytes,
                timeout_s=self.transfer_timeout_s,
            )
        self.sender = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)

    def adapter_config(self) -> str | None:
        """adapter_config.json of this run's adapter (None without LoRA): the engines write it beside each
        adapter they receive, and the export writes it."""
        from learner.lora import config_json

        return None if self.lora is None else config_json(self.lora)

    def _choose_transports(self, engine_handles: list, source: Any, mode: str) -> list[str]:
        """Per engine: shared memory when it runs on this rank's node (and /dev/shm has room), else the
        network; see actors.weight_transport.choose_transports."""
        import ray

        from actors.weight_transport import NETWORK, choose_transports, param_nbytes, shm_free_bytes

        if mode == NETWORK:  # nothing to look up
            return [NETWORK] * len(engine_handles)
        infos = ray.get([h.ready.remote() for h in engine_handles], timeout=self.transfer_timeout_s)
        nodes = [info["node"] for info in infos]
        nbytes = sum(param_nbytes(m.dtype, m.shape) for m in source.metadata())
        here = ray.get_runtime_context().get_node_id()
        transports, note = choose_transports(mode, here, nodes, nbytes, shm_free_bytes())
        self.transport_note = note
        if note is not None:
            print(f"weight transfer: {note}", flush=True)  # in the learner's log, and sync/... say which
        return transports

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
        """The full weights in HF names, on CPU (gathered under ZeRO-3; with LoRA the merged weights, as the
        export writes them). For tests."""
        zero3, out = self.learner.zero_stage == 3, {}
        for name, params, value in _export_plan(self.engine.module, self.lora is not None):
            with _gathered(params, zero3):
                out[name] = value(*(p.data.detach() for p in params)).to("cpu", copy=True)
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's saved names, on CPU (LoRA runs; gathered under ZeRO-3)."""
        from learner.lora import adapter_params

        zero3, out = self.learner.zero_stage == 3, {}
        for name, p in adapter_params(self.engine.module):
            with _gathered(p, zero3):
                out[name] = p.data.detach().to("cpu", copy=True)
        return out

    def perturb(self, scale: float, seed: int) -> None:
        """Add seeded noise to every trained weight (every weight; with LoRA the adapter's) (tests: prove that
        a broadcast really moves weights). Under ZeRO-3 each parameter is gathered (every rank), changed on
        rank 0 and partitioned again."""
        import contextlib

        import deepspeed

        g = torch.Generator().manual_seed(seed)
        zero3 = self.learner.zero_stage == 3
        with torch.no_grad():
            for p in self.engine.module.parameters():
                if self.lora is not None and not p.requires_grad:
                    continue
                whole = (
                    deepspeed.zero.GatheredParameters([p], modifier_rank=0)
                    if zero3
                    else contextlib.nullcontext()
                )
                with whole:
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
                    p.add_(noise.to(p.dtype).to(p.device) * scale)

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        # LoRA: the adapter and its optimizer state; the frozen base is the model folder's, read again on resume.
        frozen_out = self.lora is not None
        self.engine.save_checkpoint(
            directory, tag=tag, client_state=client_state, exclude_frozen_parameters=frozen_out
        )

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        _, client_state = self.engine.load_checkpoint(
            directory, tag=tag, load_module_strict=self.lora is None
        )
        return client_state or {}

    def export_adapter(self, directory: str) -> None:
        """The adapter in PEFT's format (adapter_model.safetensors, adapter_config.json), written by rank 0;
        under ZeRO-3 every rank joins the gathers."""
        from learner.lora import adapter_params, write_adapter

        zero3, tensors = self.learner.zero_stage == 3, {}
        for name, p in adapter_params(self.engine.module):
            with _gathered(p, zero3):
                if self.rank == 0:
                    tensors[name] = p.data.detach().to("cpu", copy=True)
        if self.rank == 0:
            write_adapter(directory, tensors, self.adapter_config())

    def export_hf(self, directory: str, tokenizer_from: str, shard_bytes: int = EXPORT_SHARD_BYTES) -> None:
        """A Hugging Face folder that transformers and vLLM load as they are (safetensors, sharded past
        `shard_bytes` with the usual index; tied weights once, as `save_pretrained` writes them).

        Rank 0 writes it shard by shard. Under ZeRO-3 each parameter is gathered by a collective every
        rank joins (all ranks call this), and only rank 0 keeps a copy, until its shard is on disk; at
        ZeRO 0-2 rank 0 holds the weights already and the other ranks return at once. So no rank builds
        a full state dict: rank 0 holds at most one shard (and safetensors' serialised copy of it while it
        writes), the others one gathered parameter. (By hand because `save_pretrained` takes a whole
        state dict: there is no per-shard writer in transformers or safetensors.)"""
        import json

        from safetensors.torch import save_file

        module, zero3, writer = self.engine.module, self.learner.zero_stage == 3, self.rank == 0
        if not (zero3 or writer):
            return
        plan = _export_plan(module, self.lora is not None)  # a shared (tied) parameter once, its first name
        shards = _shard_plan(
            [(p[0].ds_numel if zero3 else p[0].numel()) * p[0].element_size() for _, p, _ in plan],
            shard_bytes,
        )
        files = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        out = Path(directory)
        if writer:
            out.mkdir(parents=True, exist_ok=True)
        weight_map: dict[str, str] = {}
        total = 0
        for file, shard in zip(files, shards):
            tensors: dict[str, torch.Tensor] = {}
            for i in shard:
                name, params, value = plan[i]
                with _gathered(params, zero3):
                    if writer:
                        # A copy: the gathered tensor is released at once (ZeRO-3), and at ZeRO-1/2 the
                        # parameters are views into DeepSpeed's flat buffer, which safetensors refuses.
                        whole = value(*(p.data.detach() for p in params))
                        tensors[name] = whole.to("cpu", copy=True).contiguous()
            if writer:
                save_file(tensors, str(out / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, file))
                total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        if not writer:
            return
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if self.lora is not None:
            module = module.get_base_model()
        module.config.save_pretrained(directory)
        if module.can_generate() and module.generation_config is not None:
            module.generation_config.save_pretrained(directory)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)


def _shard_plan(sizes: list[int], shard_bytes: int) -> list[list[int]]:
    """Consecutive indices grouped into shards of at most `shard_bytes` (a larger tensor alone)."""
    shards: list[list[int]] = [[]]
    filled = 0
    for i, size in enumerate(sizes):
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(i)
        filled += size
    return shards


def _export_plan(module: torch.nn.Module, lora: bool) -> list[tuple[str, list, Any]]:
    """Per tensor an HF export writes: (name, the parameters it is made of, a function of them to it)."""
    if lora:
        from learner.lora import export_plan

        return export_plan(module)
    return [(name, [p], lambda w: w) for name, p in module.named_parameters()]


def _gathered(p: torch.nn.Parameter | list[torch.nn.Parameter], zero3: bool):
    """The whole parameter(s) on every rank for the block (a collective), under ZeRO-3; else nothing to do."""
    import contextlib

    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(p if isinstance(p, list) else [p], modifier_rank=None)

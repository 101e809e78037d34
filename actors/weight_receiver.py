"""The engines' side of the weight transfer: vLLM worker-side engines registered under duet's names.

- `duet_host` (CPU runs, and the colocated GPU mode): the bytes go through host memory, over a gloo
  group or, for an engine on learner rank 0's node, a shared-memory file (`actors.weight_transport`).
  It follows vLLM's NCCL engine's lifecycle:
  `start_weight_update` opens vLLM's layerwise reload, received tensors go to `model.load_weights`,
  `finish_weight_update` finalizes it.
- `duet_nccl` (GPUs): vLLM's own NCCL engine, unchanged, with the byte check added at its receive
  callback.

LoRA runs (`adapter` in the init info: the adapter's adapter_config.json) move the adapter, not the model:
the same transports, stamps and byte check, but what arrives is kept (`AdapterReceiver`) instead of
loaded into the model, and once the update is finished the worker writes it as a PEFT folder on its own
node and loads it into vLLM's LoRA manager in place of the last one (`DigestWorkerExtension.duet_load_adapter`;
vLLM's `finish_weight_update` drops every adapter, so it is loaded after).

Both hash what arrives with the same code at the same boundary (`ReceiveDigest`: every tensor as it
reaches `model.load_weights`, in arrival order; see `actors.weight_transport`), on the updates the driver
checks (`checksum` in the update info) and on no others.

Registered with vLLM's `WeightTransferEngineFactory` by `register`, the `vllm.general_plugins` entry
point that vLLM runs in every process it starts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
)

from actors.weight_transport import (
    NETWORK,
    SHARED_MEMORY,
    HashingLoader,
    NetworkReceiver,
    SharedMemoryReceiver,
    TensorDigest,
    cut_bucket,
    param_nbytes,
    pipelined_bucket_bytes,
    plan_buckets,
)

BACKEND_HOST = "duet_host"
BACKEND_NCCL = "duet_nccl"


class ReceiveDigest:
    """The byte check of a worker-side engine, whatever its transport: within one update (start … finish)
    every tensor handed to `model.load_weights` is hashed in arrival order when the update is checked;
    `last_digest` is the finished update's digest (None when it was not checked)."""

    last_digest: str | None = None
    _digest: TensorDigest | None = None

    def _begin_digest(self) -> None:
        self._digest = None
        self.last_digest = None

    def _receiving_model(self, model: Any, checksum: bool) -> Any:
        """What receives the tensors: `model` itself, or on a checked update a stand-in that hashes each
        tensor and then loads it into `model`."""
        if not checksum:
            return model
        if self._digest is None:
            self._digest = TensorDigest()
        return HashingLoader(model, self._digest)

    def _finish_digest(self) -> float:
        """Ends the update's check; returns the seconds spent hashing."""
        digest, self._digest = self._digest, None
        self.last_digest = None if digest is None else digest.hexdigest()
        return 0.0 if digest is None else digest.seconds


class AdapterReceiver:
    """Where an update's tensors go: the model (full weights), or, on LoRA runs, `adapter_tensors` (copied
    out of the transport's buffers, on the CPU), for `duet_load_adapter` to write and load."""

    adapter: str | None = None  # adapter_config.json of the run's adapter; None: full-weight updates
    adapter_tensors: dict[str, torch.Tensor]

    def load_weights(self, weights) -> set[str]:
        names = set()
        for name, tensor in weights:
            self.adapter_tensors[name] = tensor.detach().to("cpu", copy=True)
            names.add(name)
        return names

    def _update_target(self) -> Any:
        return self if self.adapter is not None else self.model


# ---------------------------------------------------------------- duet_host: through host memory
def repack_tied_layers(model: torch.nn.Module) -> int:
    """Layers whose weight is another layer's parameter (an output layer tied to the embedding) have
    their weights processed again after a reload; how many. vLLM's CPU layers multiply with a packed copy
    of their weight made at load (`dispatch_cpu_unquantized_gemm`, from `process_weights_after_loading`),
    and its layerwise reload repacks only the layers that loaded something. A tied output layer loads
    nothing itself (the checkpoint has no lm_head), so without this it would keep computing logits from
    the first weights while the embedding it shares moves on. On GPUs the unquantized step is a no-op."""
    owner: dict[int, torch.nn.Module] = {}
    repacked = 0
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        if id(weight) not in owner:
            owner[id(weight)] = module
            continue
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
            repacked += 1
    return repacked


@dataclass
class DuetHostInitInfo(WeightTransferInitInfo):
    master_address: str  # the gloo group's rendezvous, on learner rank 0's node
    master_port: int
    rank_offset: int  # this engine's first rank in the transfer group (the learner is rank 0)
    world_size: int
    bucket_bytes: int
    timeout_s: float = 300.0  # per collective: a peer silent this long has died or hung
    transport: str = "network"  # or "shared_memory": this engine maps segment_path instead
    segment_path: str = ""
    segment_bytes: int = 0
    adapter: str | None = None  # LoRA runs: the adapter's adapter_config.json (updates carry the adapter)


@dataclass
class DuetHostUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    checksum: bool = False  # hash this update's tensors (only on the steps the driver checks)


class DuetHostWeightTransferEngine(
    ReceiveDigest, AdapterReceiver, WeightTransferEngine[DuetHostInitInfo, DuetHostUpdateInfo]
):
    """Receiving side, one per vLLM worker: buckets from the transport, cut into named tensors (views, no
    copy), handed to `model.load_weights` bucket by bucket."""

    init_info_cls = DuetHostInitInfo
    update_info_cls = DuetHostUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.transport: NetworkReceiver | SharedMemoryReceiver | None = None
        self.bucket_bytes = 0
        self.reload_open = False  # inside initialize/finalize_layerwise_reload
        self.stats: dict[str, Any] = {}
        self.opened = 0  # transfer groups opened and closed, so a test can see none is left behind
        self.closed = 0
        self.adapter_tensors = {}

    def init_transfer_engine(self, init_info: DuetHostInitInfo) -> None:
        if self.transport is not None:  # a second init replaces the transport; never keep two open
            self.shutdown()
        self.bucket_bytes = init_info.bucket_bytes
        self.adapter = init_info.adapter
        if init_info.transport == SHARED_MEMORY:
            self.transport = SharedMemoryReceiver(init_info.segment_path, init_info.segment_bytes)
        else:
            self.transport = NetworkReceiver(
                init_info.master_address,
                init_info.master_port,
                init_info.rank_offset + self.parallel_config.rank,
                init_info.world_size,
                init_info.timeout_s,
            )
        self.opened += 1

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        t0 = time.perf_counter()
        self._begin_digest()
        self.stats = {"start_s": 0.0}
        if self.adapter is not None:  # the base model does not change: nothing of vLLM's reload
            self.adapter_tensors = {}
            return
        if self.reload_open:
            # The last update failed mid-receive and vLLM's worker dropped its session without finishing
            # the reload; layers left half-buffered would count old and new bytes together. Close it first.
            finalize_layerwise_reload(self.model, self.model_config)
        initialize_layerwise_reload(self.model)
        self.reload_open = True
        self.stats["start_s"] = time.perf_counter() - t0

    def receive_weights(self, update_info: DuetHostUpdateInfo) -> None:
        if self.transport is None:
            raise RuntimeError("weight transfer not initialised: call init_weight_transfer_engine first")
        dtypes = [getattr(torch, d) for d in update_info.dtype_names]
        sizes = [param_nbytes(d, s) for d, s in zip(dtypes, update_info.shapes)]
        buckets = plan_buckets(sizes, pipelined_bucket_bytes(sum(sizes), self.bucket_bytes))
        receiver = self._receiving_model(self._update_target(), update_info.checksum)
        load_s = 0.0
        for indices, buf in zip(buckets, self.transport.buckets([sum(sizes[i] for i in b) for b in buckets])):
            t0 = time.perf_counter()
            tensors = cut_bucket(buf, indices, update_info.names, dtypes, update_info.shapes, sizes)
            receiver.load_weights([(name, t.to(self.device)) for name, t in tensors])
            load_s += time.perf_counter() - t0
        hash_s = self._digest.seconds if self._digest is not None else 0.0
        self.stats.update(
            transport=SHARED_MEMORY if isinstance(self.transport, SharedMemoryReceiver) else NETWORK,
            bytes=float(sum(sizes)),
            buckets=float(len(buckets)),
            receive_wait_s=self.transport.wait_s,
            hash_s=hash_s,
            load_s=load_s - hash_s,
        )

    def load_floor(self, update_info: dict[str, Any], reps: int) -> list[float]:
        """What an update costs this worker with no transport at all (benchmarks/broadcast.py's same-node
        floor): the last update's bytes, copied once into private memory, loaded again through vLLM's
        layerwise reload (start, `load_weights`, finalize) `reps` times; seconds per rep. Needs the
        shared-memory transport, whose segment still holds those bytes (loading them again changes nothing)."""
        if not isinstance(self.transport, SharedMemoryReceiver):
            raise RuntimeError("the load floor is measured on an engine that receives through shared memory")
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        info = self.parse_update_info(update_info)
        dtypes = [getattr(torch, d) for d in info.dtype_names]
        sizes = [param_nbytes(d, s) for d, s in zip(dtypes, info.shapes)]
        private = self.transport.segment.clone()
        tensors = cut_bucket(private, list(range(len(sizes))), info.names, dtypes, info.shapes, sizes)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            initialize_layerwise_reload(self.model)
            self.model.load_weights([(name, t.to(self.device)) for name, t in tensors])
            finalize_layerwise_reload(self.model, self.model_config)
            times.append(time.perf_counter() - t0)
        return times

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises the accelerator, which a CPU-only worker does not have.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        t0 = time.perf_counter()
        if self.adapter is None:
            finalize_layerwise_reload(self.model, self.model_config)
            repack_tied_layers(self.model)
        self.stats["finalize_s"] = time.perf_counter() - t0
        self.reload_open = False
        self._finish_digest()

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.closed += 1
        self.transport = None


# ---------------------------------------------------------------- duet_nccl: vLLM's NCCL engine, checked
@dataclass
class DuetNCCLWeightTransferInitInfo(NCCLWeightTransferInitInfo):
    # What the fleet client adds to every engine's init info (learner.weight_sender.EngineFleetClient):
    # vLLM's own init info has no such fields and refuses the call without them.
    transport: str = "network"  # NCCL engines are always in the group
    adapter: str | None = None  # LoRA runs: the adapter's adapter_config.json (updates carry the adapter)


@dataclass
class DuetNCCLWeightTransferUpdateInfo(NCCLWeightTransferUpdateInfo):
    checksum: bool = False  # hash this update's tensors (only on the steps the driver checks)


class DuetNCCLWeightTransferEngine(ReceiveDigest, AdapterReceiver, NCCLWeightTransferEngine):
    """vLLM's NCCL engine, its receive path unchanged: while a checked update runs, the model it loads
    into is a `HashingLoader`, so every tensor its packed (or one-by-one) consumer hands to
    `model.load_weights` is hashed there, in arrival order (after its broadcast completed: the copy to the
    host waits on the stream that received it)."""

    init_info_cls = DuetNCCLWeightTransferInitInfo
    update_info_cls = DuetNCCLWeightTransferUpdateInfo

    def init_transfer_engine(self, init_info: DuetNCCLWeightTransferInitInfo) -> None:
        self.adapter = init_info.adapter
        self.adapter_tensors = {}
        super().init_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        if self.adapter is None:
            super().start_weight_update()  # vLLM's layerwise reload; an adapter update leaves the model be
        self.adapter_tensors = {}
        self._begin_digest()

    def receive_weights(self, update_info: DuetNCCLWeightTransferUpdateInfo) -> None:
        model = self.model
        self.model = self._receiving_model(self._update_target(), update_info.checksum)
        try:
            super().receive_weights(update_info)
        finally:
            self.model = model

    def finish_weight_update(self) -> None:
        if self.adapter is None:
            super().finish_weight_update()
        self._finish_digest()


class DigestWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): read back what the receiver hashed, and reseed."""

    def duet_received_digest(self) -> str | None:
        engine = getattr(self, "weight_transfer_engine", None)
        return getattr(engine, "last_digest", None)

    def duet_transfer_stats(self) -> dict:
        """Timings of the last update on this worker, and the transfer groups it opened and closed."""
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is None:
            return {}
        transport = getattr(engine, "transport", None)
        return {
            **getattr(engine, "stats", {}),
            "connected": transport is not None or getattr(engine, "model_update_group", None) is not None,
            "opened": getattr(engine, "opened", 0),
            "closed": getattr(engine, "closed", 0),
        }

    def duet_load_adapter(self, version: str) -> dict:
        """LoRA runs, after a finished update: the adapter it carried, written as a PEFT folder on this
        worker's own node (vLLM loads adapters from a local folder; no shared file system is assumed) and
        loaded into vLLM's LoRA manager under duet's one adapter id, replacing the last (load_inplace).
        Returns the folder and the adapter's bytes."""
        import shutil
        import tempfile
        from pathlib import Path

        from vllm.lora.request import LoRARequest

        from learner.lora import ENGINE_LORA_ID, ENGINE_LORA_NAME, write_adapter

        engine = self.weight_transfer_engine
        if engine is None or engine.adapter is None or not engine.adapter_tensors:
            raise RuntimeError("no adapter was received: duet_load_adapter follows a finished LoRA update")
        root = Path(tempfile.gettempdir()) / f"duet-lora-{os.getpid()}"
        folder = write_adapter(root / f"v{version}", engine.adapter_tensors, engine.adapter)
        for old in root.iterdir():
            if old != folder and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        t0 = time.perf_counter()
        self.add_lora(LoRARequest(ENGINE_LORA_NAME, ENGINE_LORA_ID, str(folder), load_inplace=True))
        nbytes = sum(t.numel() * t.element_size() for t in engine.adapter_tensors.values())
        engine.stats["adapter_load_s"] = time.perf_counter() - t0
        return {"path": str(folder), "bytes": nbytes}

    def duet_transport_floor(self, nbytes: int, reps: int) -> None:
        self.weight_transfer_engine.transport.floor(nbytes, reps)

    def duet_load_floor(self, update_info: dict, reps: int) -> list[float]:
        return self.weight_transfer_engine.load_floor(update_info, reps)

    def duet_reseed(self, seed: int) -> None:
        """Reset the sampler's generator. Per-request seeds kill the CPU engine, so RolloutEngine.generate
        reseeds the worker while a synchronous step's batch waits in the paused scheduler: the same step
        then samples the same tokens, which makes a resumed run retrace the run it continues."""
        import random

        random.seed(seed)
        torch.manual_seed(seed)


_registered = False


def register() -> None:
    """vLLM plugin entry point (`vllm.general_plugins`): runs in every vLLM process, maybe twice."""
    global _registered
    if _registered:
        return
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for name, cls in (
        (BACKEND_HOST, DuetHostWeightTransferEngine),
        (BACKEND_NCCL, DuetNCCLWeightTransferEngine),
    ):
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, cls)
    _registered = True

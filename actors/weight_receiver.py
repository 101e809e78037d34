"""A gloo weight-transfer engine for vLLM, so CPU runs use the same start/update/finish path as NCCL.

vLLM 0.32 ships NCCL/IPC engines only. This registers a `gloo` pair with vLLM's own factories
(`WeightTransferEngineFactory` for the receiving workers, `WeightTransferTrainerFactory` for the
learner), following the NCCL engine's lifecycle: `start_weight_update` opens vLLM's layerwise reload,
received tensors go to `model.load_weights`, `finish_weight_update` finalizes it.

Written by hand because vLLM has no CPU transport; the wire format is ours:
parameters are packed, in metadata order, into byte buckets of at most `bucket_bytes`
(a parameter larger than a bucket travels alone), one gloo broadcast per bucket. On the updates the driver checks (`checksum` in the update info) both
ends hash each bucket's bytes (sha256), so it can prove the engines received exactly what was sent;
on the others nobody hashes (a sha256 costs about 3× the transport per byte on these CPUs).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

BACKEND = "gloo"


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # this engine's first rank in the transfer group (the learner is rank 0)
    world_size: int
    bucket_bytes: int
    timeout_s: float = 300.0  # per collective: a peer silent this long has died or hung


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    checksum: bool = False  # hash this update's bytes (only on the steps the driver checks)


def plan_buckets(nbytes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices, in order, into buckets of at most `bucket_bytes` (one oversize
    parameter makes a bucket of its own). Sender and receivers derive the same plan from metadata."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(nbytes):
        if current and size + n > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets


def pipelined_bucket_bytes(total_bytes: int, bucket_bytes: int) -> int:
    """The bucket size both ends use: at most the configured size, but small enough that an update
    has about 8 buckets (the engine loads bucket k while bucket k+1 is on the wire, so only the last
    one's load is not hidden), and at least 4 MiB (each bucket costs one collective, ~0.3 ms here)."""
    return min(bucket_bytes, max(4 << 20, -(-total_bytes // 8)))


def param_nbytes(dtype: torch.dtype, shape: list[int] | tuple[int, ...]) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel * torch.empty((), dtype=dtype).element_size()


def digest_of(bucket_digests: list[str]) -> str:
    return hashlib.sha256("".join(bucket_digests).encode()).hexdigest()


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo group outside the default process group, so it never collides with vLLM's or DeepSpeed's."""
    store = torch.distributed.TCPStore(
        address,
        port,
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    group = torch.distributed.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))
    return store, group


class GlooWeightTransferEngine(
    WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]
):
    """Receiving side, one per vLLM worker.

    Buckets are received into buffers kept across updates (one per bucket: the model's bytes once),
    and the receive of bucket k+1 is already posted while bucket k is loaded. A buffer cannot be
    refilled within one update: vLLM's layerwise reload keeps the tensors it was given until the
    module that owns them is complete, and for some modules (padded vocabulary rows, attention
    layers) that is only at `finish_weight_update`.
    """

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.store = None
        self.bucket_bytes = 0
        self.timeout = timedelta(seconds=600.0)
        self.last_digest: str | None = None
        self.reload_open = False  # inside initialize/finalize_layerwise_reload
        self.buffers: list[torch.Tensor] = []
        self.stats: dict[str, float] = {}
        self.opened = 0  # transfer groups opened and closed, so a test can see none is left behind
        self.closed = 0

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        if self.group is not None:  # a second init replaces the group; never keep two open
            self.shutdown()
        rank = init_info.rank_offset + self.parallel_config.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.timeout = timedelta(seconds=init_info.timeout_s)
        self.store, self.group = open_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )
        self.opened += 1

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        t0 = time.perf_counter()
        if self.reload_open:
            # The last update failed mid-receive and vLLM's worker dropped its session without finishing
            # the reload; layers left half-buffered would count old and new bytes together. Close it first.
            finalize_layerwise_reload(self.model, self.model_config)
        initialize_layerwise_reload(self.model)
        self.reload_open = True
        self.last_digest = None
        self._bucket_digests: list[str] | None = None
        self.stats = {"start_s": time.perf_counter() - t0}

    def _arena(self, sizes: list[int]) -> list[torch.Tensor]:
        if [b.numel() for b in self.buffers] != sizes:
            self.buffers = [torch.empty(n, dtype=torch.uint8) for n in sizes]
        return self.buffers

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        dtypes = [getattr(torch, d) for d in update_info.dtype_names]
        sizes = [param_nbytes(d, s) for d, s in zip(dtypes, update_info.shapes)]
        buckets = plan_buckets(sizes, pipelined_bucket_bytes(sum(sizes), self.bucket_bytes))
        buffers = self._arena([sum(sizes[i] for i in b) for b in buckets])
        digests: list[str] | None = [] if update_info.checksum else None
        wait_s = load_s = hash_s = 0.0
        pending = self.group.broadcast(buffers[0], 0) if buckets else None
        for k, bucket in enumerate(buckets):
            t0 = time.perf_counter()
            pending.wait(self.timeout)
            t1 = time.perf_counter()
            # Post the next receive before loading this bucket: gloo's thread fills it meanwhile.
            pending = self.group.broadcast(buffers[k + 1], 0) if k + 1 < len(buckets) else None
            buf = buffers[k]
            if digests is not None:
                t = time.perf_counter()
                digests.append(hashlib.sha256(buf.numpy()).hexdigest())
                hash_s += time.perf_counter() - t
            t2 = time.perf_counter()
            tensors, offset = [], 0
            for i in bucket:
                t = buf[offset : offset + sizes[i]].view(dtypes[i]).view(update_info.shapes[i])
                tensors.append((update_info.names[i], t.to(self.device)))
                offset += sizes[i]
            self.model.load_weights(tensors)
            wait_s, load_s = wait_s + t1 - t0, load_s + time.perf_counter() - t2
        self._bucket_digests = digests
        self.stats = {
            **self.stats,
            "bytes": float(sum(sizes)),
            "buckets": float(len(buckets)),
            "receive_wait_s": wait_s,
            "hash_s": hash_s,
            "load_s": load_s,
        }

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises the accelerator, which a CPU-only worker does not have.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        t0 = time.perf_counter()
        finalize_layerwise_reload(self.model, self.model_config)
        self.stats["finalize_s"] = time.perf_counter() - t0
        self.reload_open = False
        digests = getattr(self, "_bucket_digests", None)
        self.last_digest = None if digests is None else digest_of(digests)

    def floor(self, nbytes: int, reps: int) -> None:
        """The transport's floor over this very group: receive `reps` flat buffers of `nbytes` from the
        trainer and acknowledge each with one byte (see the trainer's `measure_floor`)."""
        if self.group is None or self.group.size() != 2:
            raise RuntimeError("the floor is measured over a transfer group of one trainer and one worker")
        # Kept and touched once: the floor must not pay first-touch page faults on every call.
        if getattr(self, "_floor_buf", None) is None or self._floor_buf.numel() != nbytes:
            self._floor_buf = torch.zeros(nbytes, dtype=torch.uint8)
        buf = self._floor_buf
        ack = torch.zeros(1, dtype=torch.uint8)
        for _ in range(reps):
            self.group.broadcast(buf, 0).wait(self.timeout)
            self.group.broadcast(ack, 1).wait(self.timeout)

    def shutdown(self) -> None:
        if self.group is not None:
            self.closed += 1
        self.group = None
        self.store = None
        self.buffers = []
        self._floor_buf = None


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
        return {
            **getattr(engine, "stats", {}),
            "connected": getattr(engine, "group", None) is not None,
            "opened": getattr(engine, "opened", 0),
            "closed": getattr(engine, "closed", 0),
        }

    def duet_transport_floor(self, nbytes: int, reps: int) -> None:
        self.weight_transfer_engine.floor(nbytes, reps)

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

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    _registered = True

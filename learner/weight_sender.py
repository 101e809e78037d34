"""The learner's side of the weight broadcast, through vLLM's trainer-side weight-transfer API.

On GPU: vLLM's own `nccl` trainer engine. On CPU: the `gloo` pair from `actors.weight_receiver`,
registered with `WeightTransferTrainerFactory` so both paths are driven the same way:
`trainer_init(init_info, client=..., source=...)`, then one update per policy version (`send`).

Every wait of learner rank 0 has a deadline (`timeout_s`): an engine that dies or hangs mid-broadcast
ends the update with `WeightTransferError` instead of blocking the learner, and the driver replaces
the engine and reconnects (`close`, which also releases the survivors' side of the old group).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar

import ray
import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
)

from actors.weight_receiver import (
    BACKEND,
    GlooWeightTransferInitInfo,
    GlooWeightTransferUpdateInfo,
    digest_of,
    open_group,
    param_nbytes,
    pipelined_bucket_bytes,
    plan_buckets,
)

TRANSFER_TIMEOUT_S = 300.0


class WeightTransferError(RuntimeError):
    """A weight update did not complete: an engine died or hung, or the transfer group broke."""


class EngineFleetClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our RolloutEngine actors.

    Unlike vLLM's `RayVLLMWeightSyncClient` it gives each engine its own `rank_offset` in the transfer
    group (engine i's workers sit after the learner and engines 0..i-1), so N independent engines
    share one broadcast; every wait has a deadline; and `finish_weight_update` without a version
    (how vLLM's NCCL trainer engine calls it) stamps `pending_version`, the version being sent, so
    engines never resume generating under new weights with the old version number.
    """

    def __init__(
        self, handles: list, workers_per_engine: int = 1, timeout_s: float = TRANSFER_TIMEOUT_S
    ) -> None:
        self.handles = handles
        self.workers_per_engine = workers_per_engine
        self.timeout_s = timeout_s
        self.pending_version: str | None = None

    def wait(self, refs: list, what: str, deadline: float | None = None) -> list:
        """`ray.get` with a deadline; names the engines that did not answer in time."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        if len(ready) < len(refs):
            late = [i for i, r in enumerate(refs) if r not in set(ready)]
            raise WeightTransferError(
                f"engine(s) {late} did not finish {what} within the weight-transfer deadline "
                f"({self.timeout_s:.0f}s): they died or hang mid-transfer; replace them and reconnect"
            )
        return ray.get(refs)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.wait(
            [
                h.init_weight_transfer_engine.remote(
                    {**init_info, "rank_offset": 1 + i * self.workers_per_engine}
                )
                for i, h in enumerate(self.handles)
            ],
            "joining the transfer group",
        )

    def start_weight_update(self) -> None:
        self.wait([h.start_weight_update.remote() for h in self.handles], "start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.wait([h.update_weights.remote(update_info) for h in self.handles], "update_weights")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.pending_version
        self.wait([h.finish_weight_update.remote(version) for h in self.handles], "finish_weight_update")

    def begin_update(self, update_info: dict[str, Any], weight_version: str | None) -> list:
        """The whole start/update/finish round on every engine, one actor call each; returns the calls
        to `wait` on once the bytes are sent (the engines receive while the learner broadcasts)."""
        return [h.apply_weight_update.remote(update_info, weight_version) for h in self.handles]

    def shutdown_weight_transfer_engine(self) -> list[int]:
        """Release every engine's side of the transfer group (vLLM's `shutdown_weight_transfer_engine`).
        An engine that died or does not answer in time is skipped (it is being replaced);
        returns the indices of the engines that released theirs."""
        refs = [h.shutdown_weight_transfer_engine.remote() for h in self.handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(self.timeout_s, 30.0))
        released = []
        for i, ref in enumerate(refs):
            if ref in ready:
                with contextlib.suppress(Exception):
                    ray.get(ref)
                    released.append(i)
        return released


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = 64 << 20
    timeout_s: float = TRANSFER_TIMEOUT_S


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Rank 0 packs parameters into byte buckets and broadcasts them over a gloo group.

    Near the transport's floor: two staging buffers kept across updates (bucket k+1 is packed while
    bucket k is on the wire; a bucket that is one contiguous tensor goes without a copy); bytes hashed
    only when the update is checked; one actor call per engine per update (`begin_update`).
    The other learner ranks iterate the source too: under ZeRO-3 each parameter is gathered by
    a collective in which every rank takes part.
    """

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool, init_info: GlooTrainerInitInfo):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.info = init_info
        self.group = None
        self.store = None
        self.last_digest: str | None = None
        self.broken = False  # an update broke off: the group may hold half-sent collectives
        self.staging: list[torch.Tensor] = []
        self.stats: dict[str, float] = {}
        self._plan: tuple | None = None  # (metadata, update info, bucket plan), reused while unchanged

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, init_info=init_info)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address,
            master_port=init_info.master_port,
            rank_offset=1,  # the fleet client gives each engine its own offset
            world_size=init_info.world_size,
            bucket_bytes=init_info.bucket_bytes,
            timeout_s=init_info.timeout_s,
        )
        # The workers block in the rendezvous until rank 0 joins: start them first, on a side thread.
        done: list = []
        side = threading.Thread(
            target=lambda: done.append(_outcome(client.init_weight_transfer_engine, asdict(worker_info))),
            daemon=True,
        )
        side.start()
        engine.store, engine.group = open_group(
            init_info.master_address, init_info.master_port, 0, init_info.world_size, init_info.timeout_s
        )
        side.join()
        if isinstance(done[0], BaseException):
            raise done[0]
        return engine

    def _update_plan(self, meta: list[ParamMeta]) -> tuple[dict, list[list[int]], list[int]]:
        key = [(m.name, m.dtype, tuple(m.shape)) for m in meta]
        if self._plan is None or self._plan[0] != key:
            sizes = [param_nbytes(m.dtype, m.shape) for m in meta]
            self._plan = (
                key,
                asdict(describe_update(meta)),
                plan_buckets(sizes, pipelined_bucket_bytes(sum(sizes), self.info.bucket_bytes)),
                sizes,
            )
        return self._plan[1], self._plan[2], self._plan[3]

    def send_weights(self, weight_version: str | None = None, *, checksum: bool = False) -> None:
        """One update: the engines' start/update/finish round (stamped `weight_version`) around one pass of
        packed broadcasts. `checksum`: hash the bytes at both ends (the driver checks this step)."""
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # join the trainer-side gathers only
                pass
            return
        if self.broken or self.group is None:
            raise WeightTransferError("the transfer group broke in an earlier update: reconnect first")
        update_info, buckets, sizes = self._update_plan(meta)
        deadline = time.monotonic() + self.info.timeout_s
        receiving = self.client.begin_update({**update_info, "checksum": checksum}, weight_version)
        try:
            self.last_digest = self._broadcast(meta, buckets, sizes, checksum, deadline)
        except Exception as e:
            self.broken = True
            # An engine that failed first says why (e.g. it died): prefer its error to gloo's.
            ready, _ = ray.wait(receiving, num_returns=len(receiving), timeout=5.0)
            for ref in ready:
                ray.get(ref)
            raise WeightTransferError(f"weight broadcast of version {weight_version} broke off: {e}") from e
        t0 = time.perf_counter()
        try:
            self.client.wait(receiving, f"receiving version {weight_version}", deadline)
        except WeightTransferError:
            self.broken = True
            raise
        self.stats["engines_s"] = time.perf_counter() - t0

    def _broadcast(
        self,
        meta: list[ParamMeta],
        buckets: list[list[int]],
        sizes: list[int],
        checksum: bool,
        deadline: float,
    ) -> str | None:
        it = iter(self.source)
        digests: list[str] = []
        in_flight: list[tuple[Any, Any] | None] = [None, None]  # per staging slot: (work, what it holds)
        pack_s = wait_s = hash_s = 0.0

        def settle(slot: int) -> float:
            t = time.perf_counter()
            if in_flight[slot] is not None:
                in_flight[slot][0].wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
                in_flight[slot] = None
            return time.perf_counter() - t

        for k, bucket in enumerate(buckets):
            slot = k % 2
            wait_s += settle(slot)  # the buffer (or tensor) this slot sent two buckets ago is free again
            t0 = time.perf_counter()
            parts = []
            for i in bucket:
                name, tensor = next(it)
                m = meta[i]
                if name != m.name or tensor.dtype != m.dtype or tuple(tensor.shape) != tuple(m.shape):
                    raise ValueError(
                        f"weight source yielded {name!r} {tensor.dtype} {tuple(tensor.shape)}, "
                        f"metadata declared {m.name!r} {m.dtype} {tuple(m.shape)}"
                    )
                parts.append(tensor.detach())
            total = sum(sizes[i] for i in bucket)
            if len(parts) == 1 and parts[0].device.type == "cpu" and parts[0].is_contiguous():
                payload = parts[0].reshape(-1).view(torch.uint8)  # one tensor: send it in place
            else:
                payload = self._staging(slot, total)
                offset = 0
                for part, i in zip(parts, bucket):
                    payload[offset : offset + sizes[i]].copy_(part.reshape(-1).view(torch.uint8))
                    offset += sizes[i]
            pack_s += time.perf_counter() - t0
            in_flight[slot] = (self.group.broadcast(payload, 0), (payload, parts))
            if checksum:  # reading the bytes while gloo sends them is safe; nobody writes them
                t2 = time.perf_counter()
                digests.append(hashlib.sha256(payload.numpy()).hexdigest())
                hash_s += time.perf_counter() - t2
        for slot in (0, 1):
            wait_s += settle(slot)
        self.stats = {
            "bytes": float(sum(sizes)),
            "buckets": float(len(buckets)),
            "pack_s": pack_s,
            "send_wait_s": wait_s,
            "hash_s": hash_s,
        }
        return digest_of(digests) if checksum else None

    def _staging(self, slot: int, nbytes: int) -> torch.Tensor:
        """A view of `nbytes` of staging buffer `slot`; the buffers grow to the largest bucket and stay."""
        while len(self.staging) <= slot:
            self.staging.append(torch.empty(0, dtype=torch.uint8))
        if self.staging[slot].numel() < nbytes:
            self.staging[slot] = torch.empty(max(nbytes, self.info.bucket_bytes), dtype=torch.uint8)
        return self.staging[slot][:nbytes]

    def measure_floor(self, nbytes: int, reps: int, warmup: int = 2) -> list[float]:
        """The transport's floor between the same processes over the same group: rank 0 broadcasts one flat
        buffer of `nbytes`, the (single) engine worker acknowledges with one byte; seconds per rep."""
        if self.group is None or self.group.size() != 2:
            raise ValueError("the floor is measured over a transfer group of one trainer and one worker")
        refs = [h.transport_floor.remote(nbytes, warmup + reps) for h in self.client.handles]
        if getattr(self, "_floor_buf", None) is None or self._floor_buf.numel() != nbytes:
            self._floor_buf = torch.ones(nbytes, dtype=torch.uint8)
        buf = self._floor_buf
        ack = torch.zeros(1, dtype=torch.uint8)
        timeout = timedelta(seconds=self.info.timeout_s)
        times = []
        for i in range(warmup + reps):
            t = time.perf_counter()
            self.group.broadcast(buf, 0).wait(timeout)
            self.group.broadcast(ack, 1).wait(timeout)
            if i >= warmup:
                times.append(time.perf_counter() - t)
        self.client.wait(refs, "the floor measurement")
        return times

    def shutdown(self) -> None:
        """Close rank 0's side first (an engine still blocked in a receive of a broken update then fails
        at once instead of at its timeout), then release every live engine's side."""
        if self.group is not None and self.broken:
            with contextlib.suppress(Exception):
                self.group.abort()
        self.group = None
        self.store = None
        self.staging = []
        if self.is_sender:
            self.client.shutdown_weight_transfer_engine()


def _outcome(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # handed to the caller's thread
        return e


def send(
    sender: TrainerWeightTransferEngine, version: int, checksum: bool, timeout_s: float
) -> dict[str, Any]:
    """One update of every engine to `version`, with a deadline on everything rank 0 waits for.

    gloo: every wait inside has the deadline. vLLM's NCCL engine: its `finish_weight_update` carries no
    version, so the fleet client stamps `pending_version`; and its stream synchronise has no deadline, so
    the update runs on a side thread and rank 0 gives up after `timeout_s` (the communicator is then
    aborted by `close`)."""
    t0 = time.perf_counter()
    if isinstance(sender, GlooTrainerWeightTransferEngine):
        sender.send_weights(str(version), checksum=checksum)
        return {"time_s": time.perf_counter() - t0, "digest": sender.last_digest, **sender.stats}
    if sender.is_sender:
        sender.client.pending_version = str(version)
    done: list = []
    side = threading.Thread(target=lambda: done.append(_outcome(sender.send_weights)), daemon=True)
    side.start()
    side.join(timeout_s)
    if side.is_alive():
        sender.broken = True
        raise WeightTransferError(
            f"weight update to version {version} did not complete within {timeout_s:.0f}s: an engine died or "
            "hangs mid-broadcast; replace it and reconnect"
        )
    if isinstance(done[0], BaseException):
        sender.broken = True
        raise done[0]
    return {"time_s": time.perf_counter() - t0, "digest": None}


def close(sender: TrainerWeightTransferEngine | None) -> None:
    """Tear down a sender and release the engines' side of its group (vLLM's
    `shutdown_weight_transfer_engine` on every engine still alive), so reconnecting leaks nothing."""
    if sender is None:
        return
    sender.shutdown()  # the gloo engine releases the engines itself; NCCL aborts its communicator
    if sender.is_sender and not isinstance(sender, GlooTrainerWeightTransferEngine):
        sender.client.shutdown_weight_transfer_engine()


def describe_update(meta: list[ParamMeta]) -> GlooWeightTransferUpdateInfo:
    """What the receivers need to cut the byte buckets back into named tensors."""
    return GlooWeightTransferUpdateInfo(
        names=[m.name for m in meta],
        dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
        shapes=[list(m.shape) for m in meta],
    )


class ZeroModuleSource(WeightSource):
    """The learner's parameters in Hugging Face names, gathered from ZeRO-3 shards when needed.

    ZeRO 0/1/2 keep full parameters on every rank; ZeRO-3 partitions them, so each one is gathered
    (a collective over the learner group) just before it is sent and released right after.
    """

    def __init__(self, module: torch.nn.Module, zero_stage: int) -> None:
        self.module = module
        self.zero3 = zero_stage == 3

    def metadata(self) -> list[ParamMeta]:
        out = []
        for name, p in self.module.named_parameters():
            shape = tuple(p.ds_shape) if self.zero3 else tuple(p.shape)
            out.append(ParamMeta(name, p.dtype, shape))
        return out

    def __iter__(self):
        if not self.zero3:
            for name, p in self.module.named_parameters():
                yield name, p.data
            return
        import deepspeed

        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, p.data.clone()


_registered = False


def register_trainer_engine() -> None:
    global _registered
    if _registered:
        return
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, GlooTrainerWeightTransferEngine)
    _registered = True

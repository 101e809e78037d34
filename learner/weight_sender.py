"""The learner's side of the weight transfer, through vLLM's trainer-side weight-transfer API.

Two trainer engines, registered with vLLM's `WeightTransferTrainerFactory` under the names of their
worker-side pairs (`actors.weight_receiver`) and driven the same way: `trainer_init(init_info,
client=..., source=...)`, then one update per policy version (`send`).
- `duet_host` (CPU runs, the colocated GPU mode): rank 0 packs the weights into byte buckets and
  broadcasts them over a gloo group, or, for engines on its own node, packs them into a shared-memory
  file those engines map (`actors.weight_transport`; `cluster.weight_transport` chooses).
- `duet_nccl` (GPUs): vLLM's own NCCL trainer engine.

What does not depend on the transport: the version stamps (the fleet client stamps every engine's
update with the version being sent) and the byte check (on checked updates rank 0 hashes each tensor as
its source yields it, with the code the engines hash what they receive: `TensorDigest`).

Every wait of learner rank 0 has a deadline (`timeout_s`): an engine that dies or hangs mid-broadcast
ends the update with `WeightTransferError` instead of blocking the learner, and the driver replaces
the engine and reconnects (`close`, which also releases the survivors' side of the old group).

A transfer that fails or times out still finishes this rank's pass over the weights (`drain`): under
ZeRO-3 each parameter is gathered by a collective in which every learner rank takes part, so the other
ranks, iterating their own pass, would otherwise wait in a gather rank 0 never joins, and the next
collective anybody ran would meet the wrong partner. On NCCL the sending thread never gathers: rank 0's
own thread iterates the source and hands each tensor over (`Handover`), so a sending thread that hangs
in NCCL leaves no gather behind.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
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
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

from actors.weight_receiver import (
    BACKEND_HOST,
    BACKEND_NCCL,
    DuetHostInitInfo,
    DuetHostUpdateInfo,
)
from actors.weight_transport import (
    NETWORK,
    SHARED_MEMORY,
    SharedSegment,
    TensorDigest,
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
    group (engine i's workers sit after the learner and engines 0..i-1), so N independent engines share
    one broadcast; every wait has a deadline; and it stamps what vLLM's NCCL
    trainer engine leaves out: `finish_weight_update` without a version stamps `pending_version` (the
    version being sent), so engines never resume generating under new weights with the old version
    number, and `update_weights` carries `pending_checksum` (whether this update is hashed).

    `transports`: per engine, NETWORK (in the gloo group; the default) or SHARED_MEMORY (maps `segment`,
    the sender's (path, bytes), and is not in the group). `adapter`: LoRA runs, the adapter_config.json of
    the adapter the updates carry (the engines then load what they receive as that adapter).
    """

    def __init__(
        self,
        handles: list,
        workers_per_engine: int = 1,
        timeout_s: float = TRANSFER_TIMEOUT_S,
        transports: list[str] | None = None,
        adapter: str | None = None,
    ) -> None:
        self.handles = handles
        self.adapter = adapter
        self.workers_per_engine = workers_per_engine
        self.timeout_s = timeout_s
        self.transports = transports or [NETWORK] * len(handles)
        self.segment: tuple[str, int] | None = None
        self.pending_version: str | None = None
        self.pending_checksum = False

    def group_size(self) -> int:
        """Learner rank 0 and the workers of the engines that receive over the network."""
        return 1 + self.transports.count(NETWORK) * self.workers_per_engine

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
        refs, in_group = [], 0
        for h, transport in zip(self.handles, self.transports):
            info = {**init_info, "transport": transport, "adapter": self.adapter}
            if transport == SHARED_MEMORY:
                info["segment_path"], info["segment_bytes"] = self.segment
            else:
                info["rank_offset"] = 1 + in_group * self.workers_per_engine
                in_group += 1
            refs.append(h.init_weight_transfer_engine.remote(info))
        self.wait(refs, "joining the transfer group")

    def start_weight_update(self) -> None:
        self.wait([h.start_weight_update.remote() for h in self.handles], "start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        info = {**update_info, "checksum": self.pending_checksum}
        self.wait([h.update_weights.remote(info) for h in self.handles], "update_weights")

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.pending_version
        self.wait([h.finish_weight_update.remote(version) for h in self.handles], "finish_weight_update")

    def begin_update(
        self, update_info: dict[str, Any], weight_version: str | None, transport: str | None = None
    ) -> list:
        """The whole start/update/finish round on every engine (or those of one `transport`), one actor
        call each; returns the calls to `wait` on (the engines receive while the learner sends)."""
        return [
            h.apply_weight_update.remote(update_info, weight_version)
            for h, t in zip(self.handles, self.transports)
            if transport is None or t == transport
        ]

    def raise_engine_failure(self, refs: list, within_s: float = 5.0) -> None:
        """Raise the error of an update call among `refs` that failed within `within_s`, if any: when an
        update breaks off, the engine's own error (it died) says more than the transport's."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=within_s)
        for ref in ready:
            ray.get(ref)

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


def drain(pairs: Iterator) -> None:
    """The rest of this rank's pass over its weight source, sent nowhere: the gathers every learner rank
    takes part in under ZeRO-3 complete on this rank too."""
    for _ in pairs:
        pass


# ---------------------------------------------------------------- duet_host: through host memory
@dataclass
class DuetHostTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND_HOST
    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = 64 << 20
    timeout_s: float = TRANSFER_TIMEOUT_S


class DuetHostTrainerWeightTransferEngine(TrainerWeightTransferEngine[DuetHostTrainerInitInfo]):
    """Rank 0 packs parameters into byte buckets and broadcasts them over a gloo group to the engines
    that receive over the network, and packs them into a shared-memory segment for the engines on its
    node (the client's `transports`); with both, the segment is the staging and the broadcast sends from it.

    Near the transport's floor: two staging buffers kept across updates (bucket k+1 is packed while
    bucket k is on the wire; a bucket that is one contiguous tensor goes without a copy); tensors hashed
    only when the update is checked; one actor call per engine per update (`begin_update`). The
    shared-memory engines start their update once every bucket is packed: their bytes are then all there.
    The other learner ranks iterate the source too: under ZeRO-3 each parameter is gathered by
    a collective in which every rank takes part.
    """

    init_info_cls = DuetHostTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool, init_info: DuetHostTrainerInitInfo):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.info = init_info
        self.group = None
        self.store = None
        self.segment: SharedSegment | None = None
        self.last_digest: str | None = None
        self.broken = False  # an update broke off: the group may hold half-sent collectives
        self.staging: list[torch.Tensor] = []
        self.stats: dict[str, Any] = {}
        self._plan: tuple | None = (
            None  # (metadata key, update info, bucket plan, sizes), kept while unchanged
        )

    @classmethod
    def trainer_init(cls, init_info: DuetHostTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("the duet_host weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, init_info=init_info)
        if not engine.is_sender:
            return engine
        world = client.group_size()
        worker_info = DuetHostInitInfo(
            master_address=init_info.master_address,
            master_port=init_info.master_port,
            rank_offset=1,  # the fleet client gives each engine its own offset
            world_size=world,
            bucket_bytes=init_info.bucket_bytes,
            timeout_s=init_info.timeout_s,
        )
        if SHARED_MEMORY in client.transports:
            nbytes = sum(param_nbytes(m.dtype, m.shape) for m in source.metadata())
            engine.segment = SharedSegment(nbytes)
            client.segment = (engine.segment.path, nbytes)
        # The workers block in the rendezvous until rank 0 joins: start them first, on a side thread.
        done: list = []
        side = threading.Thread(
            target=lambda: done.append(_outcome(client.init_weight_transfer_engine, asdict(worker_info))),
            daemon=True,
        )
        side.start()
        try:
            if world > 1:
                engine.store, engine.group = open_group(
                    init_info.master_address, init_info.master_port, 0, world, init_info.timeout_s
                )
        finally:
            side.join()
            if engine.segment is not None:
                engine.segment.unlink()  # mapped by every engine that will ever use it (or failed)
        if isinstance(done[0], BaseException):
            engine.shutdown()
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
        """One update: the engines' start/update/finish round (stamped `weight_version`) around one pass
        over the source. `checksum`: hash the tensors at both ends (the driver checks this step)."""
        meta = self.source.metadata()
        pairs = iter(self.source)
        if not self.is_sender:
            drain(pairs)  # join the trainer-side gathers only
            return
        if self.broken or (self.group is None and self.segment is None):
            drain(pairs)
            raise WeightTransferError("the transfer group broke in an earlier update: reconnect first")
        update_info, buckets, sizes = self._update_plan(meta)
        update_info = {**update_info, "checksum": checksum}
        deadline = time.monotonic() + self.info.timeout_s
        digest = TensorDigest() if checksum else None
        receiving = self.client.begin_update(update_info, weight_version, NETWORK)
        try:
            self._pack_and_send(pairs, meta, buckets, sizes, digest, deadline)
            receiving += self.client.begin_update(update_info, weight_version, SHARED_MEMORY)
        except Exception as e:
            self.broken = True
            drain(pairs)
            self.client.raise_engine_failure(receiving)  # an engine that failed says why (e.g. it died)
            raise WeightTransferError(f"weight broadcast of version {weight_version} broke off: {e}") from e
        t0 = time.perf_counter()
        try:
            self.client.wait(receiving, f"receiving version {weight_version}", deadline)
        except Exception:  # late, or an engine's own error (it died): reconnect before the next update
            self.broken = True
            raise
        self.stats["engines_s"] = time.perf_counter() - t0
        self.last_digest = None if digest is None else digest.hexdigest()

    def _pack_and_send(
        self,
        pairs: Iterator,
        meta: list[ParamMeta],
        buckets: list[list[int]],
        sizes: list[int],
        digest: TensorDigest | None,
        deadline: float,
    ) -> None:
        in_flight: list[tuple[Any, Any] | None] = [None, None]  # per staging slot: (work, what it holds)
        pack_s = wait_s = 0.0
        offset = 0  # into the shared segment

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
                name, tensor = next(pairs)
                m = meta[i]
                if name != m.name or tensor.dtype != m.dtype or tuple(tensor.shape) != tuple(m.shape):
                    raise ValueError(
                        f"weight source yielded {name!r} {tensor.dtype} {tuple(tensor.shape)}, "
                        f"metadata declared {m.name!r} {m.dtype} {tuple(m.shape)}"
                    )
                if digest is not None:
                    digest.add(name, tensor)
                parts.append(tensor.detach())
            total = sum(sizes[i] for i in bucket)
            if self.segment is not None:  # the shared-memory engines read it here; the network gets it too
                payload = self.segment.buffer[offset : offset + total]
                _pack(payload, parts, [sizes[i] for i in bucket])
            elif len(parts) == 1 and parts[0].device.type == "cpu" and parts[0].is_contiguous():
                payload = parts[0].reshape(-1).view(torch.uint8)  # one tensor: send it in place
            else:
                payload = self._staging(slot, total)
                _pack(payload, parts, [sizes[i] for i in bucket])
            offset += total
            pack_s += time.perf_counter() - t0
            if self.group is not None:
                in_flight[slot] = (self.group.broadcast(payload, 0), (payload, parts))
        for slot in (0, 1):
            wait_s += settle(slot)
        self.stats = {
            "bytes": float(sum(sizes)),
            "buckets": float(len(buckets)),
            "pack_s": pack_s - (digest.seconds if digest is not None else 0.0),
            "send_wait_s": wait_s,
            "hash_s": digest.seconds if digest is not None else 0.0,
            "network_engines": self.client.transports.count(NETWORK),
            "shared_memory_engines": self.client.transports.count(SHARED_MEMORY),
        }

    def _staging(self, slot: int, nbytes: int) -> torch.Tensor:
        """A view of `nbytes` of staging buffer `slot`; the buffers grow to the largest bucket and stay."""
        while len(self.staging) <= slot:
            self.staging.append(torch.empty(0, dtype=torch.uint8))
        if self.staging[slot].numel() < nbytes:
            self.staging[slot] = torch.empty(max(nbytes, self.info.bucket_bytes), dtype=torch.uint8)
        return self.staging[slot][:nbytes]

    def measure_floor(self, nbytes: int, reps: int, warmup: int = 2) -> list[float]:
        """The transport's floor between the same processes over the same group: rank 0 broadcasts
        one flat buffer of `nbytes`, the (single) engine worker acknowledges with one byte; seconds per rep."""
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
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        if self.is_sender:
            self.client.shutdown_weight_transfer_engine()


def _pack(payload: torch.Tensor, parts: list[torch.Tensor], sizes: list[int]) -> None:
    offset = 0
    for part, n in zip(parts, sizes):
        payload[offset : offset + n].copy_(part.reshape(-1).view(torch.uint8))
        offset += n


# ---------------------------------------------------------------- duet_nccl: vLLM's NCCL engine
@dataclass
class DuetNCCLTrainerInitInfo(NCCLTrainerInitInfo):
    backend: ClassVar[str] = BACKEND_NCCL


class Handover(WeightSource):
    """What vLLM's NCCL trainer engine iterates on rank 0, in its sending thread: the tensors rank 0's own
    thread took from the real source, handed over one at a time (a bounded queue). The sending thread so
    never runs a gather; and it may pack one tensor while the next is gathered."""

    END = object()

    def __init__(self, meta: list[ParamMeta]) -> None:
        self.meta = meta
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.abandoned = False

    def metadata(self) -> list[ParamMeta]:
        return self.meta

    def put(self, item: Any, deadline: float, consumer: threading.Thread) -> bool:
        """Hand over `item`; False (and nothing handed over) once the consumer ended or the deadline passed."""
        if isinstance(item, tuple) and item[1].device.type == "cuda":
            # The consumer packs on its own CUDA stream: it waits for the copy this thread's stream made.
            event = torch.cuda.Event()
            event.record()
            item = (*item, event)
        while True:
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                if not consumer.is_alive() or time.monotonic() > deadline:
                    return False

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        while True:
            item = self.queue.get()
            if self.abandoned:
                raise WeightTransferError("the update was abandoned (deadline): nothing more is sent")
            if item is Handover.END:
                return
            name, tensor, *event = item
            if event:
                torch.cuda.current_stream().wait_event(event[0])
            yield name, tensor


class DuetNCCLTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """vLLM's NCCL trainer engine. `send` runs its `send_weights` on a side thread (its stream synchronise
    has no deadline) over a `Handover` of the real source, which rank 0's own thread iterates."""

    init_info_cls = DuetNCCLTrainerInitInfo

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.weights = self.source  # the real source; `source` is each update's Handover on rank 0
        self.broken = False
        self.last_digest: str | None = None


def _outcome(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:  # handed to the caller's thread
        return e


def send(
    sender: TrainerWeightTransferEngine, version: int, checksum: bool, timeout_s: float
) -> dict[str, Any]:
    """One update of every engine to `version`, with a deadline on everything rank 0 waits for; on every
    rank, the pass over the weights ends before this returns or raises. `checksum`: hash the tensors at
    both ends; the result's "digest" is rank 0's (None when not checked)."""
    t0 = time.perf_counter()
    if isinstance(sender, DuetHostTrainerWeightTransferEngine):
        sender.send_weights(str(version), checksum=checksum)
        return {"time_s": time.perf_counter() - t0, "digest": sender.last_digest, **sender.stats}
    if not isinstance(sender, DuetNCCLTrainerWeightTransferEngine):
        raise TypeError(f"no duet weight transfer for {type(sender).__name__}")
    return _send_nccl(sender, version, checksum, timeout_s, t0)


def _send_nccl(
    sender: DuetNCCLTrainerWeightTransferEngine, version: int, checksum: bool, timeout_s: float, t0: float
) -> dict[str, Any]:
    """vLLM's NCCL engine sends on a side thread from a `Handover`; this thread gathers (and on a checked
    update hashes) each tensor, hands it over while the sender takes it, and finishes the pass whatever
    the sender does. A sender still busy at the deadline is abandoned (its communicator is aborted by
    `close`) and the update fails with WeightTransferError."""
    pairs = iter(sender.weights)
    if not sender.is_sender:
        drain(pairs)
        return {"time_s": time.perf_counter() - t0, "digest": None}
    if sender.broken:
        drain(pairs)
        raise WeightTransferError("the transfer group broke in an earlier update: reconnect first")
    deadline = time.monotonic() + timeout_s
    digest = TensorDigest() if checksum else None
    sender.client.pending_version = str(version)
    sender.client.pending_checksum = checksum
    handover = Handover(sender.weights.metadata())
    sender.source = handover
    done: list = []
    side = threading.Thread(target=lambda: done.append(_outcome(sender.send_weights)), daemon=True)
    side.start()
    handed = True
    try:
        for name, tensor in pairs:
            if digest is not None:
                digest.add(name, tensor)
            if not handover.put((name, tensor), deadline, side):
                handed = False
                break
        if handed:
            handed = handover.put(Handover.END, deadline, side)
    finally:
        drain(pairs)  # what was not handed over is still gathered here, on every rank's schedule
    side.join(max(0.0, deadline - time.monotonic()))
    if side.is_alive():
        sender.broken = True
        handover.abandoned = True
        with contextlib.suppress(queue.Full):
            handover.queue.put_nowait(Handover.END)  # a sender that wakes up takes nothing more
        raise WeightTransferError(
            f"weight update to version {version} did not complete within {timeout_s:.0f}s: an engine died or "
            "hangs mid-broadcast; replace it and reconnect"
        )
    if isinstance(done[0], BaseException) or not handed:
        sender.broken = True
        why = done[0] if isinstance(done[0], BaseException) else "the sender stopped taking weights"
        raise WeightTransferError(f"weight update to version {version} failed: {why}") from (
            done[0] if isinstance(done[0], BaseException) else None
        )
    sender.last_digest = None if digest is None else digest.hexdigest()
    return {
        "time_s": time.perf_counter() - t0,
        "digest": sender.last_digest,
        "hash_s": 0.0 if digest is None else digest.seconds,
        "bytes": float(sum(param_nbytes(m.dtype, m.shape) for m in handover.metadata())),
    }


def close(sender: TrainerWeightTransferEngine | None) -> None:
    """Tear down a sender and release the engines' side of its group (vLLM's
    `shutdown_weight_transfer_engine` on every engine still alive), so reconnecting leaks nothing."""
    if sender is None:
        return
    sender.shutdown()  # duet_host releases the engines itself; NCCL destroys its communicator
    if sender.is_sender and not isinstance(sender, DuetHostTrainerWeightTransferEngine):
        sender.client.shutdown_weight_transfer_engine()


def describe_update(meta: list[ParamMeta]) -> DuetHostUpdateInfo:
    """What the receivers need to cut the byte buckets back into named tensors."""
    return DuetHostUpdateInfo(
        names=[m.name for m in meta],
        dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
        shapes=[list(m.shape) for m in meta],
    )


class ZeroModuleSource(WeightSource):
    """The learner's parameters in Hugging Face names, gathered from ZeRO-3 shards when needed; with
    `adapter_only` (LoRA runs) the adapter's parameters alone, under PEFT's saved names (learner.lora).

    ZeRO 0/1/2 keep full parameters on every rank; ZeRO-3 partitions them, so each one is gathered
    (a collective over the learner group) just before it is sent and released right after.
    """

    def __init__(self, module: torch.nn.Module, zero_stage: int, adapter_only: bool = False) -> None:
        self.module = module
        self.zero3 = zero_stage == 3
        self.adapter_only = adapter_only

    def _named(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        if self.adapter_only:
            from learner.lora import adapter_params

            yield from adapter_params(self.module)
        else:
            yield from self.module.named_parameters()

    def metadata(self) -> list[ParamMeta]:
        out = []
        for name, p in self._named():
            shape = tuple(p.ds_shape) if self.zero3 else tuple(p.shape)
            out.append(ParamMeta(name, p.dtype, shape))
        return out

    def __iter__(self):
        if not self.zero3:
            for name, p in self._named():
                yield name, p.data
            return
        import deepspeed

        for name, p in self._named():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, p.data.clone()


_registered = False


def register_trainer_engine() -> None:
    global _registered
    if _registered:
        return
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    for name, cls in (
        (BACKEND_HOST, DuetHostTrainerWeightTransferEngine),
        (BACKEND_NCCL, DuetNCCLTrainerWeightTransferEngine),
    ):
        if name not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine(name, cls)
    _registered = True

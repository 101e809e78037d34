"""The learner's side of the weight broadcast, through vLLM's trainer-side weight-transfer API.

On GPU: vLLM's own `nccl` trainer engine. On CPU: the `gloo` pair from `actors.weight_receiver`,
registered with `WeightTransferTrainerFactory` so both paths are driven the same way:
`trainer_init(init_info, client=..., source=...)`, then `send_weights()` once per policy version.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
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
    plan_buckets,
)


class EngineFleetClient:
    """vLLM's `VLLMWeightSyncClient` protocol over our RolloutEngine actors.

    Unlike vLLM's `RayVLLMWeightSyncClient` it gives each engine its own `rank_offset` in the transfer
    group (engine i's workers sit after the learner and engines 0..i-1), so N independent engines
    share one broadcast.
    """

    def __init__(self, handles: list, workers_per_engine: int = 1) -> None:
        self.handles = handles
        self.workers_per_engine = workers_per_engine

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        ray.get(
            [
                h.init_weight_transfer_engine.remote(
                    {**init_info, "rank_offset": 1 + i * self.workers_per_engine}
                )
                for i, h in enumerate(self.handles)
            ]
        )

    def start_weight_update(self) -> None:
        ray.get([h.start_weight_update.remote() for h in self.handles])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        ray.get([h.update_weights.remote(update_info) for h in self.handles])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        ray.get([h.finish_weight_update.remote(weight_version) for h in self.handles])

    def finish_version(self, weight_version: str) -> None:
        ray.get([h.set_version.remote(weight_version) for h in self.handles])


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = 64 << 20
    timeout_s: float = 600.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Rank 0 packs parameters into byte buckets and broadcasts them over a gloo group.

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
        with ThreadPoolExecutor(max_workers=1) as exe:
            future = exe.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.store, engine.group = open_group(
                init_info.master_address, init_info.master_port, 0, init_info.world_size, init_info.timeout_s
            )
            future.result()
        return engine

    def send_weights(self, weight_version: str | None = None) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # join the trainer-side gathers only
                pass
            return
        info = describe_update(meta)
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            # Receivers must be inside update_weights while we broadcast: both meet in the same collectives.
            future = exe.submit(self.client.update_weights, asdict(info))
            self.last_digest = self._broadcast(meta)
            future.result()
        finally:
            exe.shutdown(wait=False)
        self.client.finish_weight_update(weight_version)

    def _broadcast(self, meta: list[ParamMeta]) -> str:
        sizes = [param_nbytes(m.dtype, m.shape) for m in meta]
        it = iter(self.source)
        digests = []
        for bucket in plan_buckets(sizes, self.info.bucket_bytes):
            parts = []
            for i in bucket:
                name, tensor = next(it)
                if name != meta[i].name or tuple(tensor.shape) != tuple(meta[i].shape):
                    raise ValueError(f"weight source yielded {name!r}, metadata declared {meta[i].name!r}")
                parts.append(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8))
            buf = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            self.group.broadcast(buf, 0).wait()
            digests.append(hashlib.sha256(buf.numpy().tobytes()).hexdigest())
        return digest_of(digests)

    def shutdown(self) -> None:
        self.group = None
        self.store = None


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

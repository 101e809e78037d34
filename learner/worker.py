"""LearnerWorker: one Ray actor = one DeepSpeed rank (learner/rank.py holds all it does)."""

from __future__ import annotations

import ray

from learner.rank import LearnerRank


@ray.remote
class LearnerWorker(LearnerRank):
    """A `LearnerRank` as a Ray actor, placed by `LearnerGroup` on its placement-group bundle. Ray sets
    CUDA_VISIBLE_DEVICES to the bundle's GPU, which is why the rank always uses cuda:0."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.node = ray.util.get_node_ip_address()
        # vLLM's weight-transfer API (init_broadcast) imports a good part of vLLM, several seconds on a
        # small machine: here, while the engines load, rather than after them on the start-up's critical path.
        import vllm.distributed.weight_transfer.factory  # noqa: F401

        import learner.weight_sender  # noqa: F401

    def __repr__(self) -> str:  # the Ray dashboard's Repr column (taken once, after __init__)
        return (
            f"LearnerWorker(learner rank {self.rank} of {self.world_size}, node {self.node}, "
            f"ZeRO-{self.learner.zero_stage}, {self.device_kind})"
        )

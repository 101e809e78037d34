"""LearnerWorker: one Ray actor = one DeepSpeed rank (learner/rank.py holds all it does)."""

from __future__ import annotations

import ray

from learner.rank import LearnerRank


@ray.remote
class LearnerWorker(LearnerRank):
    """A `LearnerRank` as a Ray actor, placed by `LearnerGroup` on its placement-group bundle. Ray sets
    CUDA_VISIBLE_DEVICES to the bundle's GPU, which is why the rank always uses cuda:0."""

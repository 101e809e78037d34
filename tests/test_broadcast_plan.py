"""Pure unit tests of the weight broadcast's plan: which steps are checked, how bytes are bucketed."""

from __future__ import annotations

import pytest

from actors.weight_transport import pipelined_bucket_bytes, plan_buckets
from cluster.config import load_config


def test_default_cadence_checks_the_first_broadcast_and_every_tenth():
    train = load_config().train
    assert train.check_weights_every_steps == 10
    assert [v for v in range(1, 31) if train.weights_checked(v)] == [1, 10, 20, 30]


@pytest.mark.parametrize(("every", "checked"), [(0, []), (1, [1, 2, 3, 4, 5, 6]), (3, [1, 3, 6])])
def test_cadence_override(every, checked):
    train = load_config(overrides=[f"train.check_weights_every_steps={every}"]).train
    assert [v for v in range(1, 7) if train.weights_checked(v)] == checked


def test_bucket_size_pipelines_large_updates_and_keeps_small_ones_whole():
    mib = 1 << 20
    assert pipelined_bucket_bytes(int(1.3 * mib), 64 * mib) == 4 * mib  # the tiny model: one bucket
    assert pipelined_bucket_bytes(100 * mib, 64 * mib) == 100 * mib // 8  # ~8 buckets to overlap
    assert pipelined_bucket_bytes(2000 * mib, 64 * mib) == 64 * mib  # never above the configured size
    assert pipelined_bucket_bytes(100 * mib, mib // 20) == mib // 20  # nor when it is set small


def test_buckets_keep_order_and_cover_every_parameter():
    sizes = [3, 5, 9, 1, 1, 20, 2]
    buckets = plan_buckets(sizes, 8)
    assert [i for b in buckets for i in b] == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 8 or len(b) == 1 for b in buckets)  # oversize travels alone

"""Pure unit tests of the weight broadcast's plan: which steps are checked, how bytes are bucketed."""

from __future__ import annotations

import os

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


# ---- issue 24: the same-node path ----
MIB = 1 << 20


def test_transport_per_engine_follows_the_node_and_room_in_shm():
    from actors.weight_transport import choose_transports

    nodes = ["here", "there", "here"]
    assert choose_transports("auto", "here", nodes, 500 * MIB, 4096 * MIB) == (
        ["shared_memory", "network", "shared_memory"],
        None,
    )
    assert choose_transports("network", "here", nodes, 500 * MIB, 4096 * MIB) == (["network"] * 3, None)
    # A container's 64 MiB /dev/shm: auto falls back and says why; the forced mode refuses.
    transports, note = choose_transports("auto", "here", nodes, 500 * MIB, 64 * MIB)
    assert transports == ["network"] * 3 and "64 MiB free for 500 MiB" in note and "--shm-size" in note
    with pytest.raises(ValueError, match=r"shared_memory: /dev/shm has 64 MiB free for 500 MiB"):
        choose_transports("shared_memory", "here", ["here"], 500 * MIB, 64 * MIB)
    with pytest.raises(
        ValueError, match=r"shared_memory: engine\(s\) \[1\] are not on learner rank 0's node"
    ):
        choose_transports("shared_memory", "here", nodes, 500 * MIB, 4096 * MIB)
    # Nothing on this node: nothing to say about /dev/shm.
    assert choose_transports("auto", "here", ["there"], 500 * MIB, 0) == (["network"], None)


def test_shared_segment_is_one_copy_seen_by_a_second_mapping_and_leaves_no_file(tmp_path):
    import torch

    from actors.weight_transport import SharedMemoryReceiver, SharedSegment, cut_bucket

    sizes = [12, 8, 20]
    segment = SharedSegment(sum(sizes), folder=str(tmp_path))
    assert os.stat(segment.path).st_mode & 0o777 == 0o600  # only this user's processes map it
    receiver = SharedMemoryReceiver(segment.path, sum(sizes))
    segment.unlink()  # both ends mapped: the name can go
    assert list(tmp_path.iterdir()) == []
    weights = torch.arange(10, dtype=torch.float32)
    segment.buffer[:40].copy_(weights.view(torch.uint8))
    buckets = list(receiver.buckets([12, 28]))
    assert [b.numel() for b in buckets] == [12, 28]
    names, dtypes, shapes = ["a", "b", "c"], [torch.float32] * 3, [[3], [2], [5]]
    first = cut_bucket(buckets[0], [0], names, dtypes, shapes, sizes)
    rest = cut_bucket(buckets[1], [1, 2], names, dtypes, shapes, sizes)
    assert torch.equal(torch.cat([t for _, t in first + rest]), weights)
    with pytest.raises(RuntimeError, match="does not match the shared segment"):
        next(receiver.buckets([8]))
    with pytest.raises(RuntimeError, match=r"set cluster\.weight_transport=network"):
        SharedMemoryReceiver(str(tmp_path / "gone"), 4)

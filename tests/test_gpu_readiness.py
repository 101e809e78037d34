"""What can be shown on a CPU of the GPU path's readiness (issue 22): the pure parts with the hardware
readings injected, and the real stack where a CPU runs it. Each finding's tests stand in their own section,
numbered as in the issue; each fails on the code before its fix.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from actors.gpu_memory import (
    GIB,
    GpuMemory,
    GpuMemoryBusy,
    requested_bytes,
    short_of_memory,
    wait_for_gpu_memory,
)

# ---------------------------------------------------------------- 2. the byte check on every transport
# vLLM's NCCL engine cannot run here (no GPU). What runs below is vLLM's own NCCL code at both ends
# (the trainer's packed producer, the worker's packed and one-by-one consumers, under duet's subclasses
# and `learner.weight_sender.send`), with only what needs a GPU stood in for: the communicator by an
# in-memory wire, CUDA streams by no-ops, and vLLM's layerwise reload (which needs a vLLM model) by a
# toy model's plain `load_weights`. Integration-marked only because importing vLLM's model loader
# starts a subprocess (py-cpuinfo runs `file`).


class _Wire:
    """A communicator stand-in: what rank 0 broadcasts, the receiver's next broadcast call gets.
    `corrupt`: flip a byte of the n-th payload (a transport that damages data)."""

    def __init__(self, corrupt: int | None = None) -> None:
        self.payloads: queue.Queue = queue.Queue()
        self.corrupt = corrupt
        self.sent = 0

    def sender(self):
        wire = self

        class End:
            def broadcast(self, tensor, src, stream=None):
                data = tensor.detach().clone().reshape(-1).view(torch.uint8)
                if wire.sent == wire.corrupt:
                    data[0] ^= 1
                wire.sent += 1
                wire.payloads.put(data)

            def destroy(self):
                pass

        return End()

    def receiver(self):
        wire = self

        class End:
            def broadcast(self, tensor, src, stream=None):
                tensor.reshape(-1).view(torch.uint8).copy_(wire.payloads.get(timeout=10))

            def destroy(self):
                pass

        return End()


class _NoStream:
    def synchronize(self) -> None:
        pass


class _ToyModel(torch.nn.Module):
    """Receives weights the way a vLLM model does: `load_weights((name, tensor), ...)`."""

    def __init__(self, source: torch.nn.Module) -> None:
        super().__init__()
        self.params = {n: torch.zeros_like(p) for n, p in source.named_parameters()}
        self.calls: list[list[str]] = []

    def load_weights(self, weights):
        weights = list(weights)
        self.calls.append([n for n, _ in weights])
        for name, t in weights:
            self.params[name].copy_(t)
        return {n for n, _ in weights}


class _LocalHandle:
    """A RolloutEngine handle without Ray: `.method.remote(...)` runs the call here, now."""

    def __init__(self, receiver) -> None:
        self.receiver = receiver
        self.versions: list[str | None] = []

    def __getattr__(self, method):
        receiver = self.receiver

        def call(*args):
            if method == "finish_weight_update":
                self.versions.append(args[0])
                return receiver.finish_weight_update()
            return getattr(receiver, method)(*args)

        return SimpleNamespace(remote=call)


def _stub_gpu(monkeypatch) -> None:
    from vllm.distributed.weight_transfer import packed_tensor
    from vllm.model_executor.model_loader import reload

    monkeypatch.setattr(packed_tensor, "_get_streams", lambda idx, n: tuple(_NoStream() for _ in range(n)))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a: None)
    monkeypatch.setattr(reload, "initialize_layerwise_reload", lambda model: None)
    monkeypatch.setattr(reload, "finalize_layerwise_reload", lambda model, cfg: None)


def _nccl_pair(source_module, wire: _Wire, packed: bool, bucket_bytes: int):
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.distributed.weight_transfer.base import ModuleSource

    from actors.weight_receiver import DuetNCCLWeightTransferEngine
    from learner.weight_sender import DuetNCCLTrainerWeightTransferEngine, EngineFleetClient

    target = _ToyModel(source_module)
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(rank=0), model_config=None)
    receiver = DuetNCCLWeightTransferEngine(
        WeightTransferConfig(backend="duet_nccl"), vllm_config, torch.device("cpu"), target
    )
    receiver.packed, receiver.packed_buffer_size_bytes = packed, bucket_bytes
    receiver.model_update_group = wire.receiver()
    handle = _LocalHandle(receiver)
    client = EngineFleetClient([handle], timeout_s=10.0)
    client.wait = lambda refs, what, deadline=None: refs  # the calls ran already
    sender = DuetNCCLTrainerWeightTransferEngine(
        client=client,
        source=ModuleSource(source_module),
        packed=packed,
        packed_buffer_size_bytes=bucket_bytes,
    )
    sender.model_update_group = wire.sender()
    return sender, receiver, target, handle


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Tensor '0.weight' has size")  # one parameter larger than a buffer
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one_by_one"])
def test_nccl_receive_path_hashes_what_it_loads_with_the_code_every_transport_uses(monkeypatch, packed):
    """Through duet's NCCL engines (vLLM's, subclassed), a checked update's digest at the engine equals
    learner rank 0's, computed by the same `TensorDigest` over each tensor as vLLM hands it to
    `load_weights`; an unchecked one hashes nothing; a damaged byte on the wire shows. Before: the NCCL
    path returned no digest at all and the driver compared nothing."""
    from learner.weight_sender import send

    _stub_gpu(monkeypatch)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    bucket = 200  # bytes: several packed buffers, one parameter larger than a buffer

    sender, receiver, target, handle = _nccl_pair(module, _Wire(), packed, bucket)
    sent = send(sender, 3, checksum=True, timeout_s=10.0)
    assert sent["digest"] is not None and receiver.last_digest == sent["digest"]
    assert handle.versions == ["3"]  # the version stamped by the fleet client
    assert all(torch.equal(target.params[n], p) for n, p in module.named_parameters())
    assert [n for call in target.calls for n in call] == [n for n, _ in module.named_parameters()]
    if packed:
        assert len(target.calls) > 1  # several packed buffers, each hashed as it was unpacked

    sent = send(sender, 4, checksum=False, timeout_s=10.0)
    assert sent["digest"] is None and receiver.last_digest is None and handle.versions[-1] == "4"

    sender, receiver, _, _ = _nccl_pair(module, _Wire(corrupt=1), packed, bucket)
    sent = send(sender, 5, checksum=True, timeout_s=10.0)
    assert receiver.last_digest is not None and receiver.last_digest != sent["digest"]


def test_the_digest_covers_names_dtypes_shapes_and_bytes():
    from actors.weight_transport import TensorDigest, hashed

    def digest(pairs):
        d = TensorDigest()
        for _ in hashed(pairs, d):
            pass
        return d.hexdigest()

    a = torch.arange(6, dtype=torch.float32)
    base = digest([("w", a)])
    assert digest([("w", a.clone())]) == base
    assert digest([("v", a)]) != base  # the name
    assert digest([("w", a.view(2, 3))]) != base  # the shape
    assert digest([("w", a.view(torch.int32))]) != base  # the dtype, same bytes
    b = a.clone()
    b[5] = 5.000001
    assert digest([("w", b)]) != base  # one value
    assert digest([("w", a[:3]), ("x", a[3:])]) != digest([("x", a[3:]), ("w", a[:3])])  # the order


def test_a_step_that_trains_nothing_carries_the_last_check():
    """A step whose groups all tied sends nothing; its sync/checksum_match is the last checked
    broadcast's verdict (None before any), not True. Before: always True."""
    from cluster.config import load_config
    from cluster.driver import Trainer

    trainer = Trainer.__new__(Trainer)  # the loop's bookkeeping only: no actors
    trainer.cfg, trainer.version, trainer.step = load_config(), 0, 1
    trainer.last_sync_check = None
    assert trainer.learn([], [], {}, time.perf_counter())["sync/checksum_match"] is None
    trainer.healer = SimpleNamespace(retry=lambda fn, *a: {"sync/checksum_match": False})
    assert trainer.check_sync("digest", checked=True)["sync/checksum_match"] is False
    skipped = trainer.learn([], [], {}, time.perf_counter())
    assert skipped["train/skipped"] is True and skipped["sync/checksum_match"] is False
    assert trainer.check_sync(None, checked=False) == {"sync/checksum_match": None}
    assert trainer.learn([], [], {}, time.perf_counter())["sync/checksum_match"] is False


# ---------------------------------------------------------------- 3. a replacement engine waits for its GPU's memory
# (issue 22, finding 3: vLLM refuses to start while the GPU lacks the memory gpu_memory_utilization asks, and
# a killed engine's memory is given back some time after the kill.)

H100 = 79 * GIB + 123_456_789  # a total that is no whole number of GiB, as cudaMemGetInfo's are not


class FakeTime:
    """A clock that only the wait's own sleeps move: the test sees every reading, with no real time passing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def readings(*frees: list[int], holders: tuple = ()) -> tuple[list, object]:
    """A reader that returns one reading per call (then repeats the last), each GPU of total H100."""
    calls: list[int] = []

    def read() -> list[GpuMemory]:
        frees_now = frees[min(len(calls), len(frees) - 1)]
        calls.append(len(calls))
        return [GpuMemory(f"GPU {i}", free, H100, holders) for i, free in enumerate(frees_now)]

    return calls, read


@pytest.mark.integration  # importing vLLM runs `file` (platform.architecture): not for the fast tier
def test_gpu_memory_wait_asks_what_vllm_asks():
    """The wait's test is vLLM 0.32's own start-up check (vllm/v1/worker/utils.py: request_memory): for
    every reading, the wait lets vLLM start exactly when vLLM's check would pass, at the byte."""
    from vllm.config import CacheConfig
    from vllm.utils.mem_utils import MemorySnapshot
    from vllm.v1.worker.utils import request_memory

    cases = 0
    for utilization in (0.3, 0.5, 0.85, 0.9, 0.95, 0.999):
        need = requested_bytes(H100, utilization)
        for free in (0, need - 1, need, need + 1, H100):
            snapshot = MemorySnapshot(free_memory=free, total_memory=H100, device="cpu", auto_measure=False)
            try:
                assert request_memory(snapshot, CacheConfig(gpu_memory_utilization=utilization)) == need
                vllm_starts = True
            except ValueError as e:
                assert "Free memory on device" in str(e)
                vllm_starts = False
            waits = bool(short_of_memory([GpuMemory("GPU 0", free, H100)], utilization))
            assert waits == (not vllm_starts), (utilization, free, need)
            cases += 1
    assert cases == 30


def test_gpu_memory_wait_starts_once_a_killed_predecessors_memory_is_free():
    """The GPU is held (by the killed engine's process, pid 4242) for three readings, then given back: the
    wait says what it waits for, then returns, without its deadline."""
    time_ = FakeTime()
    held = ((4242, 70 * GIB),)
    calls, read = readings([8 * GIB], [8 * GIB], [9 * GIB], [78 * GIB], holders=held)
    notes: list[str] = []
    start = time_.now
    gpus = wait_for_gpu_memory(
        read, 0.9, 120.0, label="RolloutEngine 3", note=notes.append, clock=time_.clock, sleep=time_.sleep
    )
    assert [g.free_bytes for g in gpus] == [78 * GIB]
    assert len(calls) == 4 and time_.now - start < 120.0
    assert len(notes) == 2, notes
    waiting = notes[0]
    need = requested_bytes(H100, 0.9) / GIB
    for part in (
        "RolloutEngine 3",
        "GPU 0",
        "8.00 GiB free",
        f"vLLM asks {need:.2f} GiB",
        "pid 4242 70.0 GiB",
    ):
        assert part in waiting, (part, waiting)
    assert "gpu_memory_utilization=0.9" in waiting
    assert "starting vLLM" in notes[1]


def test_gpu_memory_wait_goes_at_once_when_the_memory_is_free():
    time_ = FakeTime()
    calls, read = readings([70 * GIB])
    notes: list[str] = []
    wait_for_gpu_memory(read, 0.85, 120.0, note=notes.append, clock=time_.clock, sleep=time_.sleep)
    assert len(calls) == 1 and notes == [] and time_.now == 1000.0


def test_gpu_memory_wait_of_a_tensor_parallel_engine_waits_for_every_gpu():
    """Two GPUs: the first is free at once, the second only at the third reading."""
    time_ = FakeTime()
    calls, read = readings([78 * GIB, 1 * GIB], [78 * GIB, 1 * GIB], [78 * GIB, 78 * GIB])
    notes: list[str] = []
    wait_for_gpu_memory(read, 0.9, 60.0, note=notes.append, clock=time_.clock, sleep=time_.sleep)
    assert len(calls) == 3
    assert "GPU 1" in notes[0] and "GPU 0" not in notes[0], notes[0]


def test_gpu_memory_wait_fails_at_its_deadline_naming_the_gpu_and_what_holds_it():
    time_ = FakeTime()
    _, read = readings([5 * GIB], holders=((4242, 73 * GIB), (77, 1 * GIB)))
    notes: list[str] = []
    start = time_.now
    with pytest.raises(GpuMemoryBusy) as raised:
        wait_for_gpu_memory(
            read, 0.9, 45.0, label="RolloutEngine 7", note=notes.append, clock=time_.clock, sleep=time_.sleep
        )
    message = str(raised.value)
    assert time_.now - start == pytest.approx(45.0)
    for part in (
        "RolloutEngine 7",
        "rollout.gpu_memory_wait_s=45",
        "GPU 0: 5.00 GiB free of 79.11 GiB",
        "pid 4242 73.0 GiB, pid 77 1.0 GiB",
    ):
        assert part in message, (part, message)
    # It said what it waited for at the start and again every NOTE_EVERY_S (30 s): twice in 45 s.
    assert len(notes) == 2 and all("waiting up to" in n for n in notes), notes


def test_gpu_memory_wait_is_asked_for_engines_on_gpus_only():
    """The fleet gives each engine the wait on CUDA (rollout.gpu_memory_wait_s), none on CPU, none with 0."""
    from cluster.config import load_config
    from cluster.fleet import RolloutFleet
    from cluster.placement import make_plan

    cfg = load_config(overrides=["run.device=cuda", "rollout.gpu_memory_wait_s=90"])
    fleet = RolloutFleet(cfg, make_plan(cfg, cluster_gpus=8), "model")
    assert fleet.engine_kwargs(0, 0)["gpu_memory_wait_s"] == 90.0
    off = load_config(overrides=["run.device=cuda", "rollout.gpu_memory_wait_s=0"])
    assert (
        RolloutFleet(off, make_plan(off, cluster_gpus=8), "model").engine_kwargs(0, 0)["gpu_memory_wait_s"]
        is None
    )
    cpu = load_config(overrides=["run.device=cpu"])
    assert RolloutFleet(cpu, make_plan(cpu), "model").engine_kwargs(0, 0)["gpu_memory_wait_s"] is None


# ---------------------------------------------------------------- 4. a timed-out transfer ends every rank's part
# Under ZeRO-3 each parameter is gathered by a collective of all learner ranks, in the same order on each.
# A transfer that times out on rank 0 must still finish rank 0's pass over the weights, and nothing may go
# on gathering behind it, or the next collectives meet the wrong partners and the learner hangs. The
# duet_host path on the real stack (2 ZeRO-3 ranks, an engine that hangs): test_zero3_two_ranks_... below.


class _GatherLog:
    """A weight source that records which thread ran each of its 'gathers' (one per parameter)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.threads: list[int] = []

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, p.dtype, tuple(p.shape)) for n, p in self.module.named_parameters()]

    def __iter__(self):
        for name, p in self.module.named_parameters():
            self.threads.append(threading.get_ident())
            yield name, p.data.clone()


def test_nccl_transfer_that_times_out_leaves_no_gather_behind():
    """vLLM's NCCL trainer engine sends on a side thread, whose stream synchronise has no deadline. Its
    broadcast hangs (an engine died) after the first tensor: `send` gives up at the deadline, and by then
    every parameter was gathered, all of them on the caller's thread (the one every rank runs its
    collectives on); the sending thread, released later, takes nothing more. Before: the side thread
    iterated the source itself and was left inside the pass, gathering beside the next update's."""
    from learner.weight_sender import (
        DuetNCCLTrainerWeightTransferEngine,
        EngineFleetClient,
        WeightTransferError,
        send,
    )

    class Recorder:
        def start_weight_update(self):
            pass

        def update_weights(self, info):
            pass

        def finish_weight_update(self):
            pass

    module = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])  # 8 parameters
    source = _GatherLog(module)
    client = EngineFleetClient([_LocalHandle(Recorder())], timeout_s=10.0)
    client.wait = lambda refs, what, deadline=None: refs
    sender = DuetNCCLTrainerWeightTransferEngine(client=client, source=source)
    release, taken = threading.Event(), []

    def hung_broadcast(src, meta):  # takes one tensor, then waits on a peer that never comes
        it = iter(src)
        taken.append(next(it))
        release.wait()
        taken.extend(it)

    sender._broadcast = hung_broadcast
    caller = threading.get_ident()
    t0 = time.monotonic()
    with pytest.raises(WeightTransferError, match="did not complete within 1s"):
        send(sender, 1, checksum=False, timeout_s=1.0)
    assert time.monotonic() - t0 < 5.0
    assert source.threads == [caller] * 8  # the whole pass, on the caller's thread, before send returned
    release.set()
    time.sleep(0.2)
    assert len(source.threads) == 8 and [name for name, _ in taken] == ["0.weight"]  # it took nothing more


class _HostWireThatStalls:
    """A gloo group stand-in for duet_host's sender: bucket `stall_at`'s send never completes."""

    def __init__(self, stall_at: int) -> None:
        self.stall_at, self.sent = stall_at, 0

    def broadcast(self, payload, root):
        k, self.sent = self.sent, self.sent + 1

        class Work:
            def wait(self, timeout):
                if k == self.stall_at:
                    time.sleep(timeout.total_seconds())
                    raise RuntimeError(f"Timed out waiting {timeout} for send operation to complete")

        work = Work()
        work.stall_at = self.stall_at
        return work

    def size(self):
        return 2


def test_host_transfer_that_times_out_mid_pass_finishes_the_pass_before_it_fails():
    """duet_host's sender: the send of bucket 1 of 4 never completes (the engine hangs). The update fails
    at its deadline, and by then rank 0 had gathered every parameter, on its own thread: the other ranks'
    passes end with it. Before: rank 0 raised mid-pass, the other ranks waited in a gather forever."""
    from learner.weight_sender import (
        DuetHostTrainerInitInfo,
        DuetHostTrainerWeightTransferEngine,
        EngineFleetClient,
        WeightTransferError,
    )

    class Engine:
        def apply_weight_update(self, info, version):
            return None

    module = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])  # 8 parameters, 4 buckets
    source = _GatherLog(module)
    client = EngineFleetClient([_LocalHandle(Engine())], timeout_s=10.0)
    client.wait = lambda refs, what, deadline=None: refs  # the calls ran already, without Ray
    client.raise_engine_failure = lambda refs: None
    info = DuetHostTrainerInitInfo(
        master_address="", master_port=0, world_size=2, rank=0, bucket_bytes=1 << 10, timeout_s=1.0
    )
    sender = DuetHostTrainerWeightTransferEngine(client=client, source=source, is_sender=True, init_info=info)
    sender.group = _HostWireThatStalls(stall_at=1)
    t0 = time.monotonic()
    with pytest.raises(WeightTransferError, match="broke off"):
        sender.send_weights("1")
    assert time.monotonic() - t0 < 5.0
    assert source.threads == [threading.get_ident()] * 8
    with pytest.raises(WeightTransferError, match="reconnect first"):  # and the next update still
        sender.send_weights("2")  # takes part in the gathers before it refuses
    assert len(source.threads) == 16


# ---------------------------------------------------------------- 10. broadcast.mid lands inside the transfer
def test_broadcast_mid_fires_once_the_update_is_held_inside_itself(monkeypatch):
    """`broadcast.mid` no longer fires from a 50 ms timer (after the tiny model's 20-45 ms transfers): the
    work is made to stop at a known place inside itself, and the crash comes once it is held there, naming
    the place. The real run: tests/test_crash_consistency.py's chain starts with it and asserts the place."""
    from cluster import faults

    crashed, held = [], threading.Event()

    def hold():
        def wait():
            held.wait(5)
            return "engine 0 inside its weight update"

        return wait

    monkeypatch.setattr(faults, "crash", lambda name, step, where=None: crashed.append((name, step, where)))
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point_within("broadcast.mid", 2, lambda: pytest.fail("armed without the variable"))
    monkeypatch.setenv(faults.ENV, "broadcast.mid:3")
    faults.point_within("broadcast.mid", 2, lambda: pytest.fail("armed at another step"))
    faults.point_within("broadcast.mid", 3, hold)
    time.sleep(0.1)
    assert crashed == []  # not before the work is held, however long that takes
    held.set()
    for _ in range(50):
        if crashed:
            break
        time.sleep(0.05)
    assert crashed == [("broadcast.mid", 3, "engine 0 inside its weight update")]


# ---------------------------------------------------------------- 11. two ZeRO-3 ranks broadcast to engines
@pytest.mark.timeout(600)
def test_zero3_two_ranks_broadcast_checked_then_an_engine_dies_mid_pass_and_every_rank_finishes(
    local_ray, tiny_model
):
    """Two ZeRO-3 learner ranks (every parameter partitioned: each is gathered by both ranks as it is sent)
    → two real vLLM engines, through vLLM's weight-transfer API, checked byte for byte: each engine's
    digest of what it loaded equals learner rank 0's, both report the version, agree with each other, and
    sample from exactly the learner's (gathered) weights. An unchecked update hashes nothing and lands.

    Then one engine's vLLM dies (a CUDA error, an OOM kill) and the next broadcast breaks off mid-pass on
    rank 0. Both ranks must end their part of it (issue 22, finding 4): their calls return, and the
    ranks' next collectives (a full gather) line up. The survivor, reconnected, gets checked weights.
    Before: rank 1 waited in a gather rank 0 never joined, the learner hung."""
    import os
    import signal

    from ray.util.placement_group import placement_group, remove_placement_group
    from transformers import AutoModelForCausalLM

    from actors.rollout_engine import RolloutEngine
    from cluster.config import load_config
    from cluster.placement import cpu_engine_env
    from learner.group import LearnerGroup
    from tests.helpers import assert_samples_from, vllm_process

    ray = local_ray
    path = str(tiny_model)
    cfg = load_config(
        overrides=[
            "learner.num_ranks=2",
            "learner.zero_stage=3",
            "learner.zero3_persistence_threshold=0",
            "rollout.num_engines=2",
            "learner.broadcast_bucket_mib=0.05",
        ]
    )
    engines = [
        RolloutEngine.options(runtime_env={"env_vars": cpu_engine_env(str(i))}, max_concurrency=8).remote(
            i, path
        )
        for i in range(2)
    ]
    pg = placement_group([{"CPU": 1}] * 2)
    ray.get(pg.ready())
    learner = LearnerGroup(cfg, path, pg, "cpu", 1)
    try:
        ray.get([e.ready.remote() for e in engines])
        learner.init_broadcast(engines, 1, "duet_host", timeout_s=60.0)

        before = ray.get(engines[0].weight_checksums.remote())
        learner.perturb(0.05, seed=1)  # every weight moves
        sent = learner.broadcast(7)
        # exact: each engine loaded the bytes rank 0 sent (several buckets), both at the learner's version
        received = [d for e in engines for d in ray.get(e.received_digest.remote())]
        assert sent["digest"] is not None and received == [sent["digest"]] * 2
        assert [ray.get(e.weight_version.remote()) for e in engines] == [7, 7]
        after = [ray.get(e.weight_checksums.remote()) for e in engines]
        assert after[0] == after[1] and after[0] != before

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.load_state_dict(learner.full_state_dict())  # gathered by both ranks
        model.eval()
        for engine in engines:
            assert_samples_from(ray, engine, model, version=7, prompts=3)

        # a step the driver does not check: nothing is hashed at either end, and the weights still land
        learner.perturb(0.05, seed=2)
        sent = learner.broadcast(8, checksum=False)
        assert sent["digest"] is None and sent["hash_s"] == 0.0
        assert [d for e in engines for d in ray.get(e.received_digest.remote())] == [None, None]
        stats = [s for e in engines for s in ray.get(e.transfer_stats.remote())]
        assert all(s["hash_s"] == 0.0 and s["buckets"] > 1 for s in stats)
        model.load_state_dict(learner.full_state_dict())
        assert_samples_from(ray, engines[1], model, version=8, prompts=2)
        # idle engines took both updates without pausing their scheduler
        assert [ray.get(e.ready.remote())["update_pauses"] for e in engines] == [0, 0]

        # engine 1's vLLM dies under its live actor; the next broadcast breaks off on rank 0 mid-pass
        os.kill(vllm_process(ray.get(engines[1].ready.remote())["pid"], "VLLM::EngineCore"), signal.SIGKILL)
        learner.perturb(0.05, seed=3)
        calls = [w.broadcast.remote(9, True) for w in learner.workers]
        done, _ = ray.wait(calls, num_returns=2, timeout=90)
        assert len(done) == 2, "a learner rank is still inside the broken broadcast"
        with pytest.raises(ray.exceptions.RayTaskError, match=r"EngineDeadError|broke off"):
            ray.get(calls[0])
        assert ray.get(calls[1])["digest"] is None  # rank 1 took part in every gather, sent nothing
        gathered = ray.get([w.full_state_dict.remote() for w in learner.workers], timeout=60)[0]

        learner.shutdown_broadcast()
        learner.init_broadcast(engines[:1], 1, "duet_host", timeout_s=60.0)
        sent = learner.broadcast(10)
        assert ray.get(engines[0].received_digest.remote()) == [sent["digest"]]
        assert ray.get(engines[0].weight_version.remote()) == 10
        stats = ray.get(engines[0].transfer_stats.remote())[0]
        assert stats["opened"] == 2 and stats["closed"] == 1  # the old group released, a new one open
        model.load_state_dict(gathered)
        assert_samples_from(ray, engines[0], model, version=10, prompts=2)
    finally:
        learner.shutdown()
        remove_placement_group(pg)
        for e in engines:
            with contextlib.suppress(Exception):
                ray.get(e.shutdown.remote(), timeout=30)
            ray.kill(e)

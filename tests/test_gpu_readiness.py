"""What can be shown on a CPU of the GPU path's readiness (issue 22): pure parts, with the hardware
readings injected. Each finding's tests stand in their own section.
"""

from __future__ import annotations

import pytest

from actors.gpu_memory import (
    GIB,
    GpuMemory,
    GpuMemoryBusy,
    requested_bytes,
    short_of_memory,
    wait_for_gpu_memory,
)

# ---------------------------------------------------------------- a replacement engine waits for its GPU's memory
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

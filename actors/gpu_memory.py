"""Before an engine starts vLLM on a GPU: wait, with a deadline, until the GPU has the memory vLLM will ask.

vLLM 0.32 refuses to start a worker whose GPU has less free memory than `gpu_memory_utilization` asks
(vllm/v1/worker/utils.py: `request_memory`, on the MemorySnapshot the worker takes as it starts):

    requested = ceil(total_memory × gpu_memory_utilization);   free_memory < requested → ValueError

with free and total as the CUDA driver reports them for the device (`torch.accelerator.get_memory_info`,
cudaMemGetInfo). A killed engine's memory is given back some time after the kill (its processes must exit
and the driver tear their contexts down), so an engine placed again at once on the GPU its predecessor held
can be refused. `wait_for_gpu_memory` waits until the comparison vLLM makes passes, saying what it waits
for, and fails at its deadline naming the GPU, the numbers and the processes that hold the memory.

The memory is read through NVML (vLLM's own copy, `vllm.third_party.pynvml`, with which vLLM itself asks
about devices before CUDA starts), not through CUDA: a CUDA call would open a context in the engine's actor
process, which would hold some hundreds of MiB of that very GPU for the actor's life. NVML's `free` is the
device's free memory; its v2 `total` includes what the driver reserves for itself, which cudaMemGetInfo's
total leaves out, so `total - reserved` stands for vLLM's total. Without the v2 call (an old driver) the
full total is used: the wait then asks slightly more than vLLM does (never less).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

GIB = 1 << 30
# How often the wait reads the memory, and how often it says again what it still waits for.
POLL_S = 0.5
NOTE_EVERY_S = 30.0


class GpuMemoryBusy(RuntimeError):
    """A GPU did not have the free memory vLLM asks within the wait's deadline."""


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as vLLM's start-up check sees it: free and total bytes (cudaMemGetInfo's)."""

    gpu: str  # as messages name it, e.g. "GPU 3" (NVML's index: nvidia-smi's)
    free_bytes: int
    total_bytes: int
    holders: tuple[tuple[int, int], ...] = ()  # (pid, bytes) of the processes using it, as NVML lists them


def requested_bytes(total_bytes: int, gpu_memory_utilization: float) -> int:
    """What vLLM asks of a GPU at start: ceil(total × gpu_memory_utilization) (vLLM's `request_memory`)."""
    return math.ceil(total_bytes * gpu_memory_utilization)


def short_of_memory(gpus: list[GpuMemory], gpu_memory_utilization: float) -> list[GpuMemory]:
    """The GPUs vLLM would refuse to start on: free < requested."""
    return [g for g in gpus if g.free_bytes < requested_bytes(g.total_bytes, gpu_memory_utilization)]


def describe(gpu: GpuMemory, gpu_memory_utilization: float) -> str:
    need = requested_bytes(gpu.total_bytes, gpu_memory_utilization)
    held = ", ".join(f"pid {pid} {used / GIB:.1f} GiB" for pid, used in gpu.holders) or "no process listed"
    return (
        f"{gpu.gpu}: {gpu.free_bytes / GIB:.2f} GiB free of {gpu.total_bytes / GIB:.2f} GiB, vLLM asks "
        f"{need / GIB:.2f} GiB (rollout.gpu_memory_utilization={gpu_memory_utilization:g}); held by {held}"
    )


def wait_for_gpu_memory(
    read: Callable[[], list[GpuMemory]],
    gpu_memory_utilization: float,
    timeout_s: float,
    *,
    label: str = "engine",
    note: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[GpuMemory]:
    """Until every GPU `read()` reports has the free memory vLLM will ask (see the module docstring); returns
    the last reading. Says what it waits for through `note` (stderr by default) when it starts waiting and
    every NOTE_EVERY_S after; past `timeout_s` raises GpuMemoryBusy naming the GPUs, the numbers and the
    processes holding the memory."""
    note = note or (lambda line: print(line, file=sys.stderr, flush=True))
    start = clock()
    noted_at: float | None = None
    while True:
        gpus = read()
        short = short_of_memory(gpus, gpu_memory_utilization)
        if not short:
            if noted_at is not None:
                note(f"duet: {label}: GPU memory free after {clock() - start:.1f} s; starting vLLM")
            return gpus
        now = clock()
        waited = now - start
        if waited >= timeout_s:
            raise GpuMemoryBusy(
                f"{label}: the GPU memory vLLM asks was not free within rollout.gpu_memory_wait_s="
                f"{timeout_s:g} s (an engine killed on this GPU may still hold it, or another process does): "
                + "; ".join(describe(g, gpu_memory_utilization) for g in short)
            )
        if noted_at is None or now - noted_at >= NOTE_EVERY_S:
            noted_at = now
            note(
                f"duet: {label}: waiting up to {timeout_s - waited:.0f} s more for GPU memory before starting "
                "vLLM: " + "; ".join(describe(g, gpu_memory_utilization) for g in short)
            )
        sleep(min(POLL_S, max(0.0, timeout_s - waited)))


def nvml_reader(num_gpus: int) -> Callable[[], list[GpuMemory]]:
    """Reads the memory of this process's first `num_gpus` GPUs (an engine's tensor-parallel ranks), each
    mapped to NVML's index as vLLM maps it (CUDA_VISIBLE_DEVICES, `device_id_to_physical_device_id`)."""
    from vllm.platforms import current_platform
    from vllm.third_party import pynvml

    physical = [current_platform.device_id_to_physical_device_id(i) for i in range(num_gpus)]

    def read() -> list[GpuMemory]:
        pynvml.nvmlInit()
        try:
            out = []
            for index in physical:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
                    total = int(info.total) - int(info.reserved)
                except (
                    pynvml.NVMLError
                ):  # no v2 call: the full total asks a little more than vLLM, never less
                    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                    total = int(info.total)
                try:
                    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    holders = tuple((int(p.pid), int(p.usedGpuMemory or 0)) for p in procs)
                except pynvml.NVMLError:
                    holders = ()
                out.append(GpuMemory(f"GPU {index}", int(info.free), total, holders))
            return out
        finally:
            pynvml.nvmlShutdown()

    return read

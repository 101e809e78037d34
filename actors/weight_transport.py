"""How weight bytes travel from learner rank 0 to an engine's vLLM workers, whatever carries them.

Every path shares two things, so that a transport is only a way to move bytes:

- The byte check (`TensorDigest`). On the updates the driver checks, each end hashes every tensor (its
  name, dtype, shape and bytes) in the order it passes: learner rank 0 as its weight source yields it,
  an engine worker as it reaches vLLM's `model.load_weights`. The digests are equal exactly when the
  engine loaded the learner's bytes, on every transport, vLLM's NCCL engine included (its receive
  callback is that same `load_weights` boundary). Unchecked updates hash nothing. Cost: one sha256 pass
  over the weights at each end (and a device-to-host copy of each tensor on GPUs), on checked steps only.
- The wire format of duet's own transports: parameters packed in metadata order into byte buckets
  (`plan_buckets`), the plan derived from the same metadata at both ends.

The `duet_host` engine pair moves the bytes through host memory, per engine one of two ways
(`choose_transports`, from `cluster.weight_transport` and the placement):
- network: a gloo group (TCP) of learner rank 0 and those engines' workers, one broadcast per bucket, the
  next bucket on the wire while the engine loads the last one (`NetworkReceiver` at the engine's end);
- shared memory, for an engine on learner rank 0's node: rank 0 packs the buckets into a file in /dev/shm
  that the engine's workers map too (`SharedSegment`, `SharedMemoryReceiver`), so the bytes are copied
  once, and vLLM's `load_weights` reads them where they lie. Both ends map the file before rank 0 removes
  its name, so a crash leaves nothing behind in /dev/shm.

Written by hand: vLLM 0.32 has no CPU transport.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch


# ---------------------------------------------------------------- the byte check
class TensorDigest:
    """sha256 over a stream of named tensors: each one's name, dtype, shape and bytes, in the order added.
    A tensor on an accelerator is copied to the host first (the copy waits for the work that wrote it)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.tensors = 0
        self.nbytes = 0
        self.seconds = 0.0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t0 = time.perf_counter()
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        self._sha.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        data = t.contiguous().reshape(-1).view(torch.uint8)
        self._sha.update(data.numpy())  # hashlib releases the GIL over large buffers
        self.tensors += 1
        self.nbytes += data.numel()
        self.seconds += time.perf_counter() - t0

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def hashed(pairs: Iterable[tuple[str, torch.Tensor]], digest: TensorDigest | None) -> Iterator:
    """The sender's side of the check: `pairs` as they are, each added to `digest` (None: nothing hashed)."""
    for name, tensor in pairs:
        if digest is not None:
            digest.add(name, tensor)
        yield name, tensor


class HashingLoader:
    """The receiver's side of the check: stands in for the model where a weight-transfer engine calls
    `model.load_weights`, adds each tensor to `digest` as it arrives, then loads it. Everything else is
    the model's."""

    def __init__(self, model: Any, digest: TensorDigest) -> None:
        self.model, self.digest = model, digest

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Any:
        weights = list(weights)
        for name, tensor in weights:
            self.digest.add(name, tensor)
        return self.model.load_weights(weights)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


# ---------------------------------------------------------------- the wire format
def param_nbytes(dtype: torch.dtype, shape: list[int] | tuple[int, ...]) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel * torch.empty((), dtype=dtype).element_size()


def plan_buckets(nbytes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices, in order, into buckets of at most `bucket_bytes` (one oversize
    parameter makes a bucket of its own). Sender and receivers derive the same plan from metadata."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(nbytes):
        if current and size + n > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets


def pipelined_bucket_bytes(total_bytes: int, bucket_bytes: int) -> int:
    """The bucket size both ends use: at most the configured size, but small enough that an update
    has about 8 buckets (the engine loads bucket k while bucket k+1 is on the wire, so only the last
    one's load is not hidden), and at least 4 MiB (each bucket costs one collective, ~0.3 ms here)."""
    return min(bucket_bytes, max(4 << 20, -(-total_bytes // 8)))


def cut_bucket(
    buf: torch.Tensor, indices: list[int], names: list[str], dtypes: list, shapes: list, sizes: list[int]
) -> list[tuple[str, torch.Tensor]]:
    """The named tensors a bucket's bytes hold (views of `buf`, no copy)."""
    out, offset = [], 0
    for i in indices:
        out.append((names[i], buf[offset : offset + sizes[i]].view(dtypes[i]).view(shapes[i])))
        offset += sizes[i]
    return out


# ---------------------------------------------------------------- network: a gloo group
def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo group outside the default process group, so it never collides with vLLM's or DeepSpeed's."""
    store = torch.distributed.TCPStore(
        address,
        port,
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    group = torch.distributed.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))
    return store, group


class NetworkReceiver:
    """An engine worker's end of the gloo group. Buckets are received into buffers kept across updates
    (one per bucket: the model's bytes once), and the receive of bucket k+1 is posted before bucket k is
    handed on. A buffer cannot be refilled within one update: vLLM's layerwise reload keeps the tensors
    it was given until the module that owns them is complete, for some modules (padded vocabulary rows,
    attention layers) only at `finish_weight_update`."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        self.timeout = timedelta(seconds=timeout_s)
        self.store, self.group = open_group(address, port, rank, world_size, timeout_s)
        self.buffers: list[torch.Tensor] = []
        self.wait_s = 0.0

    def buckets(self, bucket_sizes: list[int]) -> Iterator[torch.Tensor]:
        """Each bucket's bytes, in order, as they arrive."""
        if [b.numel() for b in self.buffers] != bucket_sizes:
            self.buffers = [torch.empty(n, dtype=torch.uint8) for n in bucket_sizes]
        self.wait_s = 0.0
        pending = self.group.broadcast(self.buffers[0], 0) if bucket_sizes else None
        for k in range(len(bucket_sizes)):
            t0 = time.perf_counter()
            pending.wait(self.timeout)
            self.wait_s += time.perf_counter() - t0
            # Post the next receive before handing this bucket on: gloo's thread fills it meanwhile.
            pending = self.group.broadcast(self.buffers[k + 1], 0) if k + 1 < len(bucket_sizes) else None
            yield self.buffers[k]

    def floor(self, nbytes: int, reps: int) -> None:
        """Receive side of the trainer's `measure_floor`: `reps` flat buffers of `nbytes`, each acknowledged
        with one byte (the transport's floor over this very group)."""
        if self.group.size() != 2:
            raise RuntimeError("the floor is measured over a transfer group of one trainer and one worker")
        # Kept and touched once: the floor must not pay first-touch page faults on every call.
        if getattr(self, "_floor_buf", None) is None or self._floor_buf.numel() != nbytes:
            self._floor_buf = torch.zeros(nbytes, dtype=torch.uint8)
        ack = torch.zeros(1, dtype=torch.uint8)
        for _ in range(reps):
            self.group.broadcast(self._floor_buf, 0).wait(self.timeout)
            self.group.broadcast(ack, 1).wait(self.timeout)

    def close(self) -> None:
        self.group = self.store = None
        self.buffers = []
        self._floor_buf = None


# ---------------------------------------------------------------- shared memory: one node
SHM_DIR = "/dev/shm"
NETWORK, SHARED_MEMORY = "network", "shared_memory"


def shm_free_bytes(folder: str = SHM_DIR) -> int:
    """Bytes a new file in `folder` may still take (0 when there is no such folder). A container's /dev/shm
    is often 64 MiB (Docker's default): writing past it kills the writer with SIGBUS, so check first."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def choose_transports(
    mode: str, learner_node: str, engine_nodes: list[str], nbytes: int, shm_free: int
) -> tuple[list[str], str | None]:
    """Per engine, how the weights reach it, and why an engine that could share memory does not (None when
    nothing needs saying). `mode`: cluster.weight_transport. Shared memory needs the engine on learner rank
    0's node and room for one copy of the weights in /dev/shm; `auto` falls back to the network otherwise,
    `shared_memory` refuses (ValueError)."""
    if mode == NETWORK:
        return [NETWORK] * len(engine_nodes), None
    local = [node == learner_node for node in engine_nodes]
    room = nbytes <= shm_free
    if mode == SHARED_MEMORY and not (all(local) and room):
        where = [i for i, ok in enumerate(local) if not ok]
        why = (
            f"engine(s) {where} are not on learner rank 0's node {learner_node}"
            if where
            else f"{SHM_DIR} has {shm_free / 2**20:.0f} MiB free for {nbytes / 2**20:.0f} MiB of weights"
        )
        raise ValueError(
            f"cluster.weight_transport=shared_memory: {why}; use auto (shared memory where it can, the network "
            "elsewhere) or network"
        )
    if any(local) and not room:
        note = (
            f"{SHM_DIR} has {shm_free / 2**20:.0f} MiB free for {nbytes / 2**20:.0f} MiB of weights: engines on "
            f"learner rank 0's node receive over the network (a container's /dev/shm is often 64 MiB: "
            "docker run --shm-size, or Ray's object store, sets it)"
        )
        return [NETWORK] * len(engine_nodes), note
    return [SHARED_MEMORY if ok else NETWORK for ok in local], None


class SharedSegment:
    """Learner rank 0's end: a file in /dev/shm of one update's bytes, mapped shared. Created with mode 0600
    (only this user's processes map it); `unlink` removes the name once every engine has mapped it."""

    def __init__(self, nbytes: int, folder: str = SHM_DIR) -> None:
        self.nbytes = nbytes
        self.path = os.path.join(folder, f"duet-weights-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        self.buffer = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)

    def unlink(self) -> None:
        """The name goes; the mappings (and the memory) stay until the last process unmaps."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.unlink()
        self.buffer = None


class SharedMemoryReceiver:
    """An engine worker's end of a `SharedSegment`: the buckets are views of the mapped file, in the order
    and at the offsets rank 0 packed them; nothing is copied before vLLM's `load_weights`. Rank 0 starts
    an engine's update only once it has packed every bucket, so there is nothing to wait for here."""

    def __init__(self, path: str, nbytes: int) -> None:
        if not os.path.exists(path):
            raise RuntimeError(
                f"shared-memory weight segment {path} is not visible to this engine's process (another "
                "/dev/shm, e.g. a container of its own): set cluster.weight_transport=network"
            )
        self.segment = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self.wait_s = 0.0

    def buckets(self, bucket_sizes: list[int]) -> Iterator[torch.Tensor]:
        if sum(bucket_sizes) != self.segment.numel():
            raise RuntimeError(
                f"update of {sum(bucket_sizes)} bytes does not match the shared segment's {self.segment.numel()}"
            )
        offset = 0
        for n in bucket_sizes:
            yield self.segment[offset : offset + n]
            offset += n

    def close(self) -> None:
        self.segment = None

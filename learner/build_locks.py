"""Orphaned build locks of torch's C++ extensions: found, named and removed while the learner waits on one.

DeepSpeed loads its ops through torch's JIT extension builder (on CPU, `deepspeed.init_distributed` loads
the shared-memory all-reduce op, `deepspeed_shm_comm`, in every learner rank). Each load, even of an op
already built, takes a file "baton", BUILD_DIR/lock: created with O_CREAT|O_EXCL, held open, removed on
release (torch/utils/file_baton.py). A process killed while it holds one (a learner rank lost during start-up,
a driver stopped with Ctrl-C) leaves the file behind, and from then on every learner on that machine waits
for it forever in `FileBaton.wait`, silently: a run that hangs at start without saying why.

torch records no owner, so this module tells a live baton from an orphan the only way the file allows: a live
holder keeps it open, so some process on this host has a descriptor on it (/proc/PID/fd). An orphan (no
process has it open, in two looks `CONFIRM_S` apart, the same file both times) is removed, saying so. A live
baton is never touched, whatever its age: a slow build is only waited for.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

CONFIRM_S = 2.0  # between the two looks that must both find no holder (release is close-then-remove)
POLL_S = 5.0  # how often the watch looks while the learner starts


def extensions_root() -> str:
    """Where torch builds JIT extensions: $TORCH_EXTENSIONS_DIR, or the user's cache (torch's own rule)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def build_locks(root: str) -> list[str]:
    """The batons present under `root`: ROOT/<name>/lock (TORCH_EXTENSIONS_DIR) or ROOT/<pyXY_device>/<name>/lock
    (the default root)."""
    return sorted(
        glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))
    )


def holders(path: str) -> list[int]:
    """Pids of the processes on this host with `path` open (those /proc lets this user read)."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return []
    pids = []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        with contextlib.suppress(OSError):  # a process that exits meanwhile, or one we may not read
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(fd_dir, fd))
                    if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                        pids.append(int(fd_dir.split("/")[2]))
                        break
    return pids


def remove_orphans(
    root: str, note: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep
) -> list[str]:
    """Removes the batons under `root` that no process holds (checked twice, CONFIRM_S apart, on the same
    inode); returns their paths."""
    note = note or (lambda line: print(line, file=sys.stderr, flush=True))
    suspects = {}
    for path in build_locks(root):
        with contextlib.suppress(FileNotFoundError):
            if not holders(path):
                suspects[path] = os.stat(path).st_ino
    if not suspects:
        return []
    sleep(CONFIRM_S)
    removed = []
    for path, inode in suspects.items():
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == inode and not holders(path):
                os.remove(path)
                removed.append(path)
                note(
                    f"duet: removed {path}: a torch extension build lock that no process holds (left by a process "
                    "killed while it built or loaded a DeepSpeed op); every learner on this machine would wait "
                    "for it forever"
                )
    return removed


@contextlib.contextmanager
def orphaned_build_locks_removed(root: str | None = None) -> Iterator[None]:
    """While the body runs (DeepSpeed's start-up, which may load ops), look every POLL_S for orphaned batons
    and remove them: one left before the body started, or by a process killed while the body waits."""
    root = root or extensions_root()
    stop = threading.Event()

    def watch() -> None:
        while True:
            with contextlib.suppress(Exception):  # the watch must never break the start-up it guards
                remove_orphans(root)
            if stop.wait(POLL_S):
                return

    thread = threading.Thread(target=watch, name="duet-build-lock-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()

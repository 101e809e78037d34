"""A torch extension build lock left by a killed process no longer hangs every later learner on the machine
(learner/build_locks.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from learner.build_locks import build_locks, holders, remove_orphans

REPO = Path(__file__).resolve().parents[1]


def test_an_orphaned_lock_is_removed_and_a_held_one_is_kept(tmp_path):
    held = tmp_path / "py311_cpu" / "op_a" / "lock"
    orphan = tmp_path / "op_b" / "lock"  # the $TORCH_EXTENSIONS_DIR layout: no pyXY_device level
    held.parent.mkdir(parents=True)
    orphan.parent.mkdir(parents=True)
    baton = FileBaton(str(held))  # torch's own baton, held by this process
    assert baton.try_acquire()
    orphan.touch()  # created and closed: what a killed holder leaves
    assert build_locks(str(tmp_path)) == sorted([str(held), str(orphan)])
    assert holders(str(held)) == [os.getpid()]
    assert holders(str(orphan)) == []

    notes: list[str] = []
    removed = remove_orphans(str(tmp_path), note=notes.append, sleep=lambda s: None)

    assert removed == [str(orphan)]
    assert not orphan.exists() and held.exists()
    assert len(notes) == 1 and str(orphan) in notes[0] and "no process holds" in notes[0]
    baton.release()  # the holder's release still works: its file was left alone
    assert not held.exists()
    assert remove_orphans(str(tmp_path), note=notes.append, sleep=lambda s: None) == []


@pytest.mark.integration
def test_deepspeed_op_loads_past_the_lock_of_a_process_killed_while_loading_it(tmp_path):
    """A process holding DeepSpeed's shm op baton is SIGKILLed (as a learner rank lost in start-up is); a learner
    process then loads the op as LearnerRank.join does. Unguarded, that load waits forever in FileBaton.wait."""
    root = tmp_path / "ext"
    built = Path.home() / ".cache" / "torch_extensions" / "py311_cpu" / "deepspeed_shm_comm"
    if (built / "deepspeed_shm_comm.so").exists():  # already built by a learner: the load is ninja's no-op
        shutil.copytree(built, root / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(root), DS_ACCELERATOR="cpu")

    holder = subprocess.Popen(
        [sys.executable, "-c", f"from torch.utils.file_baton import FileBaton; import time\n"
         f"assert FileBaton({str(lock)!r}).try_acquire(); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.exists() and holders(str(lock)) == []  # the orphan, as production leaves it

    load = textwrap.dedent("""
        from deepspeed.comm.torch import build_shm_op
        from learner.build_locks import orphaned_build_locks_removed
        with orphaned_build_locks_removed():
            assert build_shm_op() is not None
        print("loaded")
    """)
    out = subprocess.run(
        [sys.executable, "-c", load], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded" in out.stdout
    assert f"duet: removed {lock}" in out.stderr
    assert not lock.exists()

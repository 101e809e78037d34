"""Deterministic crash points for crash-consistency tests: the driver SIGKILLs itself at a named point.

    DUET_FAULT_POINT=checkpoint.before_rename:3     die there at step 3
    DUET_FAULT_POINT=step.after_learn:2,metrics.mid_write:5   the first of these reached

The kill goes to the driver's whole process group (its local Ray, engines and learner with it), as a
real crash of the machine or an OOM kill of the job would; tests start the driver with
`start_new_session=True` so that the group is the run's alone. Unset (the normal case), `point` is a
dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

ENV = "DUET_FAULT_POINT"

# Every point the driver passes, in the order a step reaches them (the crash sweep runs each).
POINTS = (
    "step.after_generate",  # the step's groups scored, nothing learned yet
    "step.after_learn",  # the learner stepped, the engines still hold the old weights
    "broadcast.mid",  # inside a weight update: engine 0 loaded the bytes, not finished (version not stamped)
    "step.before_metrics",  # weights broadcast, the step's metrics row not yet written
    "metrics.mid_write",  # half of the step's metrics row written
    "step.after_metrics",  # metrics row written, no checkpoint of this step yet
    "checkpoint.before_write",
    "checkpoint.during_write",  # DeepSpeed's files written under .tmp-step_N, driver_state.json not yet
    "checkpoint.before_rename",  # everything written and fsynced, still under .tmp-step_N
    "checkpoint.after_rename",  # step_N complete, older checkpoints not yet pruned
    "resume.after_load",  # a resumed run loaded its checkpoint, metrics.jsonl not yet truncated
)


def _armed() -> dict[str, int]:
    spec = os.environ.get(ENV, "").strip()
    armed: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, step = item.rpartition(":")
        if name not in POINTS or not step.isdigit():
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not POINT:STEP with POINT one of {list(POINTS)}")
        armed[name] = int(step)
    return armed


def armed_at(name: str, step: int) -> bool:
    return _armed().get(name) == step


def crash(name: str, step: int, where: str | None = None) -> None:
    """SIGKILL this process's group, now (no cleanup, no flush: that is the point)."""
    said = f" ({where})" if where else ""
    print(f"{ENV}: crashing at {name}:{step}{said}", file=sys.stderr, flush=True)
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def point(name: str, step: int) -> None:
    """Die here when DUET_FAULT_POINT names this point at this step."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    if os.environ.get(ENV) and armed_at(name, step):
        crash(name, step)


def point_within(name: str, step: int, hold: Callable[[], Callable[[], str]]) -> None:
    """A point inside work the caller is about to start (e.g. a weight update), wherever the work's own
    timing puts it: `hold()` makes the work stop at a known place inside itself and returns a wait that
    ends, naming the place, once the work is held there; the driver then dies, from a side thread, while
    the caller is still inside the work. (A timer fired after the tiny model's 20-45 ms transfers.)"""
    if not (os.environ.get(ENV) and armed_at(name, step)):
        return
    held = hold()
    threading.Thread(target=lambda: crash(name, step, held()), daemon=True).start()

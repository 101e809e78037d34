"""Ask several actors at once, with one deadline, and tell the dead from the slow.

`ray.get` on a list raises on the first failure and `ray.wait` says only what is ready, so the
per-actor verdict that fault handling needs (answered / dead / silent) is written here, once.
"""

from __future__ import annotations

from typing import Any

import ray

ANSWERED, DEAD, SILENT = "answered", "dead", "silent"


def poll(refs: list[ray.ObjectRef], timeout_s: float) -> list[tuple[str, Any]]:
    """(verdict, value) per ref, in order: value is the result when ANSWERED, else None.
    DEAD: the actor's process is gone; SILENT: no answer within `timeout_s` (all refs share it)."""
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out: list[tuple[str, Any]] = []
    for ref in refs:
        try:
            out.append((ANSWERED, ray.get(ref, timeout=0)))
        except ray.exceptions.GetTimeoutError:
            out.append((SILENT, None))
        except ray.exceptions.RayActorError:
            out.append((DEAD, None))
    return out

"""Ask several actors at once, with one deadline, and tell the dead from the slow.

`ray.get` on a list raises on the first failure and `ray.wait` says only what is ready, so the
per-actor verdict that fault handling needs (answered / dead / silent) is written here, once.
"""

from __future__ import annotations

from typing import Any

import ray

ANSWERED, DEAD, SILENT, FAILED = "answered", "dead", "silent", "failed"


def poll(refs: list[ray.ObjectRef], timeout_s: float) -> list[tuple[str, Any]]:
    """(verdict, value) per ref, in order: value is the result when ANSWERED, else None.
    DEAD: the actor's process is gone; SILENT: no answer within `timeout_s` (all refs share it);
    FAILED: the actor lives but the call raised (e.g. EngineDeadError: vLLM died under the actor)."""
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out: list[tuple[str, Any]] = []
    for ref in refs:
        try:
            out.append((ANSWERED, ray.get(ref, timeout=0)))
        except ray.exceptions.GetTimeoutError:
            out.append((SILENT, None))
        except ray.exceptions.RayActorError:
            out.append((DEAD, None))
        except ray.exceptions.RayTaskError:
            out.append((FAILED, None))
    return out

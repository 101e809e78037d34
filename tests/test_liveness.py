"""`poll`: one deadline for several actors, and the dead told apart from the slow and from a live actor
whose call raised (real Ray actors)."""

from __future__ import annotations

import time

from cluster.liveness import ANSWERED, DEAD, FAILED, SILENT, poll


def test_poll_tells_answered_dead_and_silent_apart(local_ray):
    ray = local_ray

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self, delay_s: float = 0.0) -> str:
            time.sleep(delay_s)
            return "pong"

        def broken(self) -> str:
            raise RuntimeError("what EngineDeadError is to a live RolloutEngine")

    alive, dead, slow, failing = Probe.remote(), Probe.remote(), Probe.remote(), Probe.remote()
    ray.get([p.ping.remote() for p in (alive, dead, slow, failing)])
    ray.kill(dead, no_restart=True)
    t0 = time.perf_counter()
    refs = [alive.ping.remote(), dead.ping.remote(), slow.ping.remote(30.0), failing.broken.remote()]
    verdicts = poll(refs, timeout_s=5.0)
    assert verdicts == [(ANSWERED, "pong"), (DEAD, None), (SILENT, None), (FAILED, None)]
    assert time.perf_counter() - t0 < 20  # one shared deadline, not one per actor

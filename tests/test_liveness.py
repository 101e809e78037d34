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
    for _ in range(300):  # the kill lands asynchronously: a call sent just after it may still be answered
        try:
            ray.get(dead.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("ray.kill did not land within 30 s")
    t0 = time.perf_counter()
    refs = [alive.ping.remote(), dead.ping.remote(), slow.ping.remote(30.0), failing.broken.remote()]
    verdicts = poll(refs, timeout_s=5.0)
    assert verdicts == [(ANSWERED, "pong"), (DEAD, None), (SILENT, None), (FAILED, None)]
    assert time.perf_counter() - t0 < 20  # one shared deadline, not one per actor


def test_fleet_wait_generates_again_the_chunks_of_engines_that_hang_or_fail(local_ray):
    """RolloutFleet.generate, the synchronous step's and the evaluation's wait, on stand-in engine actors:
    a chunk whose call fails goes to `on_failure` (the driver's healer replaces the engine) and is generated
    again; with no chunk back for `rollout.stall_check_s`, `on_stall` runs (the healer replaces what hangs)
    and the chunks of engines replaced meanwhile are generated again (spread over the fleet as it then is).
    Every prompt comes back once. (The real engines hang and die in tests/test_faults_*.py and test_weight_sync.py.)"""
    import asyncio

    from cluster.config import load_config
    from cluster.fleet import RolloutFleet
    from cluster.records import Prompt

    ray = local_ray

    @ray.remote(num_cpus=0)
    class StandInEngine:
        def __init__(self, behaviour: str) -> None:
            self.behaviour = behaviour

        def load(self) -> int:
            return 0

        async def generate(self, prompts, group_size, sampling, deterministic, seed, env=None, tools=None):
            if self.behaviour == "hangs":
                await asyncio.sleep(3600)
            if self.behaviour == "fails":
                raise RuntimeError("what EngineDeadError is to a live RolloutEngine")
            return [[f"{self.behaviour}:{p.index}"] * group_size for p in prompts]

    fleet = RolloutFleet(load_config(overrides=["rollout.stall_check_s=2"]), plan=None, model_path="")
    fleet.engines = [StandInEngine.remote(b) for b in ("answers", "hangs", "fails")]
    fleet.ids, fleet.next_id = [0, 1, 2], 3
    calls: list[tuple] = []

    def replace(slot: int) -> None:
        fleet.engines[slot], fleet.ids[slot] = StandInEngine.remote(f"new{slot}"), fleet.next_id
        fleet.next_id += 1

    def on_failure(engine_id: int, error: BaseException) -> bool:
        calls.append(("failure", engine_id, type(error).__name__))
        replace(fleet.ids.index(engine_id))
        return True

    def on_stall() -> None:
        calls.append(("stall", time.monotonic() - t0))
        replace(1)

    prompts = [Prompt(i, f"{i}+1=", str(i + 1)) for i in range(6)]
    t0 = time.monotonic()
    chunks = list(fleet.generate(prompts, 2, on_failure=on_failure, on_stall=on_stall))
    by_prompt = {p.index: groups[k] for _, chunk, groups in chunks for k, p in enumerate(chunk)}
    assert sorted(by_prompt) == list(range(6)) and sum(len(c) for _, c, _ in chunks) == 6  # each once
    # the hung engine's prompts (1 and 4) and the failed one's (2 and 5) came back from engines that answer
    assert {g[0].split(":")[0] for g in by_prompt.values()} <= {"answers", "new1", "new2"}, by_prompt
    assert set(engine_id for engine_id, _, _ in chunks) <= {0, 3, 4}, chunks
    assert all(len(g) == 2 for g in by_prompt.values())
    assert calls[0] == ("failure", 2, "RayTaskError(RuntimeError)") and calls[1][0] == "stall", calls
    assert 2.0 <= calls[1][1] < 10.0 and len(calls) == 2, calls

"""Engine recovery, the one path: every place that finds an engine dead comes here.

An engine dies two ways: its actor (a call raises RayActorError) or vLLM's own processes under a live
actor (RayTaskError wrapping EngineDeadError; the actor's `alive()` answers False); or it hangs. A
failure only says that something went wrong, so `heal` asks every engine a cheap liveness question,
replaces those that are dead or silent in their slots, and gives the changed fleet a new weight-transfer
group and the current weights before it takes prompts (RunActors.reconnect_fleet): an engine never
generates with stale weights. The asynchronous producer is held meanwhile, so it never submits to a
fleet that is changing; it reports the engines whose calls failed (`lost_engines`) and replaces none.

Callers: the synchronous rollout (before a step, and a chunk whose engine died), the asynchronous wait
(lost engines, a stall), the broadcast, the sync check, evaluation, and the control API's scale request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from cluster.fleet import ENGINE_FAILURES
from cluster.pipeline import RolloutProducer, failure_name
from cluster.run_actors import RunActors

# After a call failed, how long `heal` keeps asking before it concludes that no engine died: vLLM marks an
# engine dead a moment after its worker process dies (its monitor thread, then the engine core's message
# to the client), so a call can fail with EngineDeadError before `alive()` answers False.
FAILURE_GRACE_S = 15.0
# After a failure, once some engine is found dead, how long `heal` waits before it asks again and replaces
# every engine found dead either time: deaths that come together (a node; a worker and an actor killed at
# once) are noticed moments apart, and each engine start missed costs a whole start (about 40 s on CPU).
SETTLE_S = 2.0


class FleetHealer:
    """Replaces dead engines of `actors.fleet`, holding `producer` (asynchronous mode) meanwhile. Every
    method takes the current policy `version`: the weights a replaced engine is given."""

    def __init__(self, actors: RunActors, producer: RolloutProducer | None = None) -> None:
        self.actors, self.producer = actors, producer

    def heal(
        self,
        reason: str,
        version: int,
        timeout_s: float = 30.0,
        after_failure: bool = False,
        probe_s: float = 0.0,
    ) -> dict | None:
        """Replace the engines that died (found by a cheap call answered within `timeout_s`), reconnect and
        push the current weights. Returns the broadcast's result, or None when every engine was alive.
        `after_failure`: a call has just failed, so ask again for up to FAILURE_GRACE_S before None.
        `probe_s` > 0: vLLM's engine cores must answer too (a hung core under a live actor is replaced);
        only where no weight update is in flight (`heal_hung`), see RolloutEngine.health."""
        fleet = self.actors.fleet
        dead = fleet.dead_slots(timeout_s, probe_s)
        give_up = time.monotonic() + (FAILURE_GRACE_S if after_failure else 0.0)
        while not dead and time.monotonic() < give_up:
            time.sleep(1.0)
            dead = fleet.dead_slots(timeout_s, probe_s)
        if not dead:
            return None
        if after_failure:
            time.sleep(SETTLE_S)
            dead = dict(sorted({**fleet.dead_slots(timeout_s, probe_s), **dead}.items()))
        with self.held():
            for _ in range(3):
                # The old actor still answers when only vLLM under it died or hangs: it is asked to shut down.
                fleet.replace(
                    {k: (f"{reason}: {what}", what.startswith("vLLM")) for k, what in dead.items()}, version
                )
                # Asked again before the new transfer group opens: an engine can die, or be seen dead (vLLM
                # marks itself dead a moment after its worker), while others are replaced. Let into the
                # group, a dead one leaves everyone waiting out the transfer timeout.
                dead = fleet.dead_slots(timeout_s, probe_s)
                if not dead:
                    break
            return self.actors.reconnect_fleet(version)

    def heal_hung(self, reason: str, version: int) -> dict | None:
        """Replace the engines that died or hang: whose actor gives no answer in 10 s, or whose vLLM engine
        core gives none in 5 s. Called when nothing came back for `rollout.stall_check_s`, and before each
        broadcast (a hung engine would hold the transfer until its deadline); never while a weight update
        may be in flight (a core receiving weights answers after the transfer)."""
        return self.heal(reason, version, timeout_s=10.0, probe_s=5.0)

    def retry(self, fn: Callable[[], Any], reason: str, version: int, attempts: int = 3) -> Any:
        """Run `fn()`; if an engine died meanwhile, heal the fleet and run it again (another engine may die
        during the rerun: up to `attempts` runs in all)."""
        for _ in range(attempts - 1):
            try:
                return fn()
            except ENGINE_FAILURES:
                if self.heal(reason, version, after_failure=True) is None:
                    raise
        return fn()

    def replaced(self, engine_id: int, error: BaseException, version: int) -> bool:
        """Engine `engine_id`'s generate call failed with `error`: heal (another failure may have replaced
        it already). False when it still answers a liveness call: not a death to mend."""
        self.heal(f"died mid-step: {failure_name(error)}", version, after_failure=True)
        return engine_id not in self.actors.fleet.ids

    def heal_lost_engines(self, version: int) -> bool:
        """Replace the engines whose calls failed in the producer; True when there were any. An engine that
        failed a call but is alive is an error the run cannot mend: raised."""
        lost = self.producer.lost_engines()
        if not lost:
            return False
        self.heal(f"died mid-step: {', '.join(sorted(set(lost.values())))}", version, after_failure=True)
        alive = {i: e for i, e in lost.items() if i in self.actors.fleet.ids}
        if alive:
            raise RuntimeError(
                f"engines {sorted(alive)} failed a generate call but are alive: {alive}"
            ) from self.producer.error_of(next(iter(alive)))
        return True

    def resize(self, engines: int, version: int) -> None:
        """The control API's scale request, applied between steps: engines removed finish their groups
        first; new engines get the current weights before they take prompts."""
        if engines != len(self.actors.fleet.engines):
            with self.held(drain=True):
                self.actors.fleet.resize(engines, version)
                self.actors.reconnect_fleet(version)

    @contextlib.contextmanager
    def held(self, drain: bool = False) -> Iterator[None]:
        """The producer (if any) submits nothing while the fleet changes; see RolloutProducer.held."""
        with self.producer.held(drain) if self.producer else contextlib.nullcontext():
            yield

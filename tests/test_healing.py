"""FleetHealer.heal's order of work, on a stand-in fleet (the real engines die in tests/test_faults_*.py).

The full suite once SIGKILLed engine 1's vLLM worker and engine 0's actor together: heal saw engine 0 dead
and engine 1 still alive (vLLM marks itself dead a moment after its worker dies), replaced engine 0, and
opened the new weight-transfer group with the dead engine 1 in it; everyone then waited out the transfer
timeout. heal must ask again after replacing, and open the group only on a fleet it found alive.
"""

from __future__ import annotations

from types import SimpleNamespace

from cluster.healing import FleetHealer


class StandInFleet:
    """Answers `dead_slots` from a script, one answer per call; records what heal asked of it."""

    def __init__(self, answers: list[dict[int, str]]) -> None:
        self.answers, self.calls = answers, []

    def dead_slots(self, timeout_s: float = 30.0, probe_s: float = 0.0) -> dict[int, str]:
        self.calls.append("dead_slots")
        return self.answers.pop(0) if self.answers else {}

    def replace(self, dead: dict[int, tuple[str, bool]], version: int) -> None:
        self.calls.append(("replace", sorted(dead), [answers for _, answers in dead.values()], version))


def test_an_engine_seen_dead_while_others_are_replaced_is_replaced_before_the_group_opens():
    fleet = StandInFleet([{0: "actor died"}, {1: "vLLM died"}, {}])
    actors = SimpleNamespace(
        fleet=fleet, reconnect_fleet=lambda version: fleet.calls.append("reconnect") or {}
    )
    assert FleetHealer(actors).heal("died mid-step", version=7) == {}
    assert fleet.calls == [
        "dead_slots",
        ("replace", [0], [False], 7),
        "dead_slots",
        ("replace", [1], [True], 7),  # vLLM died under a live actor: it is asked to shut vLLM down first
        "dead_slots",
        "reconnect",
    ]


def test_engines_found_dead_together_are_replaced_in_one_call_and_a_live_fleet_is_left_alone():
    fleet = StandInFleet([{0: "actor died", 1: "no answer in 10 s", 2: "vLLM hung: no answer in 5 s"}, {}])
    actors = SimpleNamespace(
        fleet=fleet, reconnect_fleet=lambda version: fleet.calls.append("reconnect") or {}
    )
    FleetHealer(actors).heal("found dead before a step", version=3)
    # a hung vLLM under a live actor: the actor is asked to shut it down first, as for a dead one
    assert fleet.calls == [
        "dead_slots",
        ("replace", [0, 1, 2], [False, False, True], 3),
        "dead_slots",
        "reconnect",
    ]
    alive = StandInFleet([])
    assert FleetHealer(SimpleNamespace(fleet=alive)).heal("before a step", version=3) is None
    assert alive.calls == ["dead_slots"]


def test_after_a_failure_deaths_noticed_moments_apart_are_replaced_together(monkeypatch):
    """Engine 0's actor and engine 1's vLLM worker killed at once: vLLM notices its dead worker a moment
    after Ray reports the dead actor. One start for both, not one after the other (a start each)."""
    import cluster.healing

    monkeypatch.setattr(cluster.healing, "SETTLE_S", 0.0, raising=False)
    fleet = StandInFleet([{0: "actor died"}, {1: "vLLM died"}, {}])
    actors = SimpleNamespace(
        fleet=fleet, reconnect_fleet=lambda version: fleet.calls.append("reconnect") or {}
    )
    FleetHealer(actors).heal("died mid-step", version=5, after_failure=True)
    assert fleet.calls == [
        "dead_slots",
        "dead_slots",
        ("replace", [0, 1], [False, True], 5),
        "dead_slots",
        "reconnect",
    ]

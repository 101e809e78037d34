"""The watchdog's rule (cluster/watchdog.py) on metrics rows, and that its defaults stay quiet on what
short and untrained runs look like."""

from __future__ import annotations

from cluster.config import WatchdogConfig
from cluster.watchdog import Watchdog


def step(errors: int = 0, correct: int = 0, wrong: int = 0, signal: int = 0, groups: int = 4) -> dict:
    reasons = {"error": errors, "correct": correct, "wrong": wrong}
    return {
        "groups/total": groups,
        "groups/with_signal": signal,
        "reward/mean": correct / max(errors + correct + wrong, 1),
        **{f"reward/reason/{k}": v for k, v in reasons.items() if v},
    }


def test_mostly_errors_for_n_steps_stops_naming_the_verifier():
    dog = Watchdog(WatchdogConfig(error_steps=3))
    assert dog.observe(step(errors=6, correct=2, signal=1)) is None
    assert dog.observe(step(errors=7, wrong=1)) is None
    why = dog.observe(step(errors=8))
    assert why is not None and "verifier errors" in why and "rewards.remote_token" in why


def test_a_good_step_resets_the_count():
    dog = Watchdog(WatchdogConfig(error_steps=2, tied_steps=2))
    assert dog.observe(step(errors=8)) is None
    assert dog.observe(step(correct=4, wrong=4, signal=3)) is None
    assert dog.observe(step(errors=8)) is None  # one in a row again
    assert dog.observe(step(errors=3, correct=5, signal=2)) is None  # below error_fraction


def test_every_group_tied_for_n_steps_stops():
    dog = Watchdog(WatchdogConfig(error_steps=2, tied_steps=2))
    assert dog.observe(step(wrong=8)) is None
    why = dog.observe(step(wrong=8))
    assert why is not None and "tied" in why and "no gradient" in why


def test_its_count_survives_a_resume():
    dog = Watchdog(WatchdogConfig(error_steps=2, tied_steps=2))
    dog.observe(step(wrong=8))
    again = Watchdog(WatchdogConfig(error_steps=2, tied_steps=2))
    again.load_state(dog.state())
    assert again.observe(step(wrong=8)) is not None


def test_off_when_disabled():
    dog = Watchdog(WatchdogConfig(enabled=False, error_steps=1, tied_steps=1))
    assert dog.observe(step(errors=8)) is None and dog.observe(step(wrong=8)) is None


def test_defaults_stay_quiet_on_short_and_untrained_runs():
    """The project's tests run at most 30 steps (test_scaling.py); an untrained model ties every group (SmolLM2 in
    test_real_model; the untrained tiny model of benchmarks/pipeline.py, 20 steps)."""
    dog = Watchdog(WatchdogConfig())
    assert all(dog.observe(step(wrong=256)) is None for _ in range(49))
    dog = Watchdog(WatchdogConfig())
    assert all(dog.observe(step(errors=8)) is None for _ in range(9))

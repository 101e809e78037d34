"""RewardPool on a real local Ray cluster: real RewardWorker actors, real sandbox children.

The fault tests kill a worker actor in the middle of a batch (ray.kill, and SIGKILL of its pid) and
check the two promises that matter to the trainer: every item gets exactly one result, in order,
and the pool replaced the worker and keeps serving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
import ray

from cluster.config import RewardsConfig
from cluster.records import VerifyItem, VerifyResult
from rewards.pool import RewardPool
from tests.helpers import CUSTOM_DISPATCH, free_ports, integration_fixture, ray_actors, reward_server

TIMEOUT_S = 2.0  # wall-clock limit: a margin for a 2-core machine loaded by other jobs
SLOW = "\\boxed{" + "(" * 60 + "1" + ")" * 60 + "}"  # math-verify needs far more than TIMEOUT_S
NAP = VerifyItem("", "", "custom", "naps")  # takes 0.25 s and scores 1: makes a batch last, CPU-free


@integration_fixture(scope="module")
def ray_cluster() -> None:
    # address="local": a new cluster of our own, even when another Ray runs on this machine. Its dashboard
    # serves Ray's state API, which the naming test reads the workers' names and reprs back from.
    ray.init(
        address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=free_ports(1)[0], log_to_driver=False,
    )  # fmt: skip
    yield
    ray.shutdown()


@integration_fixture(scope="module")
def reward_server_url() -> str:
    """A real `python -m rewards.server` on a loopback port, for the pool's `remote` items."""
    with reward_server("--workers", "1", "--token", "t0k") as url:
        yield url


@pytest.fixture(scope="module")
def pool(ray_cluster: None, reward_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> RewardPool:
    token_file = tmp_path_factory.mktemp("secrets") / "reward.token"
    token_file.write_text("t0k\n")
    cfg = RewardsConfig(
        num_workers=2,
        timeout_s=TIMEOUT_S,
        custom_function=CUSTOM_DISPATCH,  # behaviour chosen by the item's prompt
        remote_url=reward_server_url,
        remote_token_file=str(token_file),
    )
    p = RewardPool(cfg)
    yield p
    p.shutdown()


def numbered(n: int, slow_every: int = 0, nap_every: int = 0) -> tuple[list[VerifyItem], list[str]]:
    """Items whose expected reason is known per index: correct, wrong, no_answer, or timeout."""
    items, expected = [], []
    for i in range(n):
        if slow_every and i % slow_every == slow_every - 1:
            items.append(VerifyItem(SLOW, "1"))
            expected.append("timeout")
        elif nap_every and i % nap_every == nap_every - 1:
            items.append(NAP)
            expected.append("correct")
        elif i % 3 == 0:
            items.append(VerifyItem(f"so \\boxed{{{i}}}", str(i)))
            expected.append("correct")
        elif i % 3 == 1:
            items.append(VerifyItem(f"so \\boxed{{{i + 1}}}", str(i)))
            expected.append("wrong")
        else:
            items.append(VerifyItem(f"I think it is {i}", str(i)))
            expected.append("no_answer")
    return items, expected


def check(results: list[VerifyResult], expected: list[str]) -> None:
    assert len(results) == len(expected)
    got = [r.reason for r in results]
    assert got == expected


def test_score_keeps_order_and_answers_every_item(pool: RewardPool) -> None:
    items, expected = numbered(120, slow_every=40)
    t0 = time.perf_counter()
    results = pool.score(items)
    check(results, expected)
    assert all(r.reward == (1.0 if r.reason == "correct" else 0.0) for r in results)
    assert time.perf_counter() - t0 < 30
    assert pool.score([]) == []
    assert pool.num_workers == 2


def test_score_async_overlaps(pool: RewardPool) -> None:
    a_items, a_expected = numbered(40)
    b_items, b_expected = numbered(30, slow_every=15)
    ha, hb = pool.score_async(a_items), pool.score_async(b_items)
    check(pool.wait(hb), b_expected)
    check(pool.wait(ha), a_expected)


def _kill_mid_batch(pool: RewardPool, how: str) -> None:
    items, expected = numbered(48, nap_every=2)  # 24 naps over 2 workers: the batch lasts ~3 s
    n_replaced = len(pool.replaced)
    victim = pool.workers[0]
    pid = pool.worker_pids()[0]

    def kill() -> None:
        if how == "ray.kill":
            ray.kill(victim, no_restart=True)
        else:
            os.kill(pid, signal.SIGKILL)

    timer = threading.Timer(1.0, kill)
    timer.start()
    t0 = time.perf_counter()
    results = pool.score(items)
    timer.join()
    assert time.perf_counter() - t0 > 1.0, "the batch ended before the kill: it did not test anything"
    check(results, expected)  # every item exactly once, in order, with its real verdict (retried)
    assert len(pool.replaced) == n_replaced + 1
    entry = pool.replaced[-1]
    assert entry["worker"] == 0 and entry["reason"].startswith("died") and entry["time"] > 0
    assert pool.worker_pids()[0] != pid
    more, more_expected = numbered(20)
    check(pool.score(more), more_expected)  # and the pool keeps serving on the replacement


def test_ray_kill_worker_mid_batch(pool: RewardPool) -> None:
    _kill_mid_batch(pool, "ray.kill")


def test_sigkill_worker_pid_mid_batch(pool: RewardPool) -> None:
    _kill_mid_batch(pool, "os.kill")


def test_worker_dead_between_calls_is_replaced_by_worker_pids(pool: RewardPool) -> None:
    """The race CI once hit: a worker dies between two scoring calls and the driver asks for pids
    (to write actors.json) before any scoring notices. That must replace it, not raise."""
    n_replaced = len(pool.replaced)
    pid = pool.worker_pids()[1]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    pids = pool.worker_pids()
    assert pids[1] is not None and pids[1] != pid and pids[0] is not None
    assert len(pool.replaced) == n_replaced + 1 and pool.replaced[-1]["reason"] == "found dead"
    more, more_expected = numbered(10)
    check(pool.score(more), more_expected)
    # Issue 22, item 16: on the dashboard (Ray's state API) every worker has a name and a repr; a replacement
    # keeps its slot and counts up its start in both (the dead one's name is not free until Ray declares it
    # dead, which after a node's loss takes its heartbeat timeout).
    workers = ray_actors("RewardWorker")
    names = sorted(a["name"] for a in workers)
    assert len(names) == len(set(names)) == pool.num_workers, workers
    [second] = [a for a in workers if "/reward-worker-1." in a["name"]]
    start = int(second["name"].rsplit(".", 1)[1])
    assert start >= 2, second
    assert second["repr_name"].startswith(
        f"RewardWorker(reward worker 1, start {start} of its slot, node "
    ), second
    [first] = [a for a in workers if "/reward-worker-0" in a["name"]]
    assert first["repr_name"].startswith("RewardWorker(reward worker 0"), first
    dead = ray_actors("RewardWorker", "DEAD")  # the replaced ones keep their names in Ray's history
    assert any(
        a["name"] == second["name"].rsplit(".", 1)[0] + ("" if start == 2 else f".{start - 1}") for a in dead
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_item_that_kills_its_worker_twice_scores_worker_died(pool: RewardPool) -> None:
    """A poison item kills every worker that runs it: retried once, then `error: worker died`."""
    n_replaced = len(pool.replaced)
    items = [
        VerifyItem("fine", "x", "custom", "kills_parent"),
        VerifyItem("KILL-PARENT", "x", "custom", "kills_parent"),
        VerifyItem("\\boxed{2}", "2"),
    ]
    results = pool.score(items)  # 3 items over 2 workers: chunks of one, the poison is alone
    assert [r.reason for r in results] == ["correct", "error: worker died", "correct"]
    assert len(pool.replaced) == n_replaced + 2
    more, more_expected = numbered(10)
    check(pool.score(more), more_expected)


def test_remote_items_go_to_the_reward_server(pool: RewardPool) -> None:
    """verifier="remote" items leave the workers for the real reward server, and come back in order."""
    items, expected = numbered(12)
    mixed = [
        VerifyItem(it.completion, it.reference, "remote" if i % 2 else "math") for i, it in enumerate(items)
    ]
    check(pool.score(mixed), expected)


def test_hung_worker_is_killed_and_replaced(ray_cluster: None) -> None:
    """A worker that stops answering (SIGSTOP) is declared hung past its chunk's budget and replaced."""
    p = RewardPool(RewardsConfig(num_workers=2, timeout_s=TIMEOUT_S), chunk_size=1, hung_grace_s=1.0)
    pid = p.worker_pids()[0]
    try:
        # (no remote_url in this pool: remote items are scored as errors, never raised)
        results = p.score([VerifyItem("\\boxed{1}", "1", verifier="remote"), VerifyItem("\\boxed{1}", "1")])
        assert results[0].reason.startswith("error: remote") and results[1].reason == "correct"
        os.kill(pid, signal.SIGSTOP)
        items, expected = numbered(20)
        t0 = time.perf_counter()
        check(p.score(items), expected)
        assert time.perf_counter() - t0 < 30
        assert len(p.replaced) == 1 and p.replaced[0]["reason"].startswith("hung")
        assert p.worker_pids()[0] != pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        p.shutdown()


def test_chunk_queued_behind_another_callers_chunk_is_not_declared_hung(ray_cluster: None) -> None:
    """Issue 11, finding 9: one worker, two callers. Caller A's chunk of 4 timeouts keeps the worker
    busy ~4 s; caller B's one-item chunk waits behind it in the worker's queue. B's budget must count
    from when A's chunk answered, not from when B sent: before, B's clock (1 × (timeout + 1 s) +
    grace = 3 s) ran out while the healthy worker was still on A's chunk, and the worker was killed
    as hung (and A's chunk run a second time)."""
    cfg = RewardsConfig(num_workers=1, timeout_s=1.0)
    p = RewardPool(cfg, chunk_size=4, hung_grace_s=1.0)
    try:
        t0 = time.perf_counter()
        slow = p.score_async([VerifyItem(SLOW, "1")] * 4)
        time.sleep(0.5)  # A's chunk is sent (and running) first
        quick = p.score_async([VerifyItem("\\boxed{2}", "2")])
        assert [r.reason for r in p.wait(quick, timeout=60)] == ["correct"]
        waited = time.perf_counter() - t0
        assert [r.reason for r in p.wait(slow, timeout=60)] == ["timeout"] * 4
        assert waited > 3.5, f"B answered after {waited:.1f} s: it was never queued behind A's chunk"
        assert p.replaced == [], p.replaced
    finally:
        p.shutdown()


def test_hung_worker_is_still_caught_behind_other_callers(ray_cluster: None) -> None:
    """The other side of the same budget: a worker stopped (SIGSTOP) with chunks of two callers
    queued on it is declared hung once its head chunk overruns, and both callers get every result."""
    p = RewardPool(RewardsConfig(num_workers=1, timeout_s=1.0), chunk_size=2, hung_grace_s=1.0)
    pid = p.worker_pids()[0]
    try:
        os.kill(pid, signal.SIGSTOP)
        a_items, a_expected = numbered(4)
        b_items, b_expected = numbered(3)
        t0 = time.perf_counter()
        ha, hb = p.score_async(a_items), p.score_async(b_items)
        check(p.wait(ha, timeout=120), a_expected)
        check(p.wait(hb, timeout=120), b_expected)
        assert time.perf_counter() - t0 < 60
        assert len(p.replaced) == 1 and p.replaced[0]["reason"].startswith("hung"), p.replaced
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        p.shutdown()

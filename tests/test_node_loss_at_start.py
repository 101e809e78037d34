"""Start-up right after a node loss (issue 22, finding 1): Ray lists a lost node alive until its GCS has
missed enough of the node's health checks, and meanwhile may place an actor there; when it declares the node
dead, it fails that actor ("The actor never ran"). Start-up starts such an actor again elsewhere, and when
nothing is left for it, says which node was lost (cluster/liveness.py: await_ready).

A Ray cluster on this machine (ray.cluster_utils: a head without CPUs, two worker raylets with addresses of
their own). One worker node holds the only engine and learner resources; it is killed, and while Ray still
lists it alive (asserted), a reward worker and a tool worker are aimed at it (a soft node affinity: Ray sends
the lease there while it lists the node alive, elsewhere once it does not), and an engine and a learner rank
already placed on it are waited for. The whole run after a node loss: tests/test_cluster_sim.py.
"""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.integration

SURVIVOR, DOOMED = "127.0.0.2", "127.0.0.3"  # 127/8 addresses reach this machine through loopback
# The GCS declares a node dead after this many missed health checks, one a second: about 5 s.
HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


@pytest.mark.timeout(300)
def test_actors_lost_with_their_node_before_ready_start_again_or_name_the_node(tiny_model):
    import ray
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.config import EnvConfig, load_config
    from cluster.fleet import RolloutFleet
    from cluster.placement import make_plan
    from cluster.preflight import PreflightError
    from cluster.records import Prompt, VerifyItem
    from envs.pool import ToolPool
    from learner.group import LearnerGroup
    from rewards.pool import RewardPool

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH},
    )
    reset_ray_address()  # no other Ray user on this machine joins this cluster by accident
    fleet = pool = learner_pg = tools = None
    starting = threading.Thread()  # the learner's start-up, below
    try:
        survivor = cluster.add_node(num_cpus=2, node_ip_address=SURVIVOR)
        doomed = cluster.add_node(
            num_cpus=2, node_ip_address=DOOMED, resources={"duet_engine": 2, "duet_learner": 2}
        )
        ray.init(address=cluster.address, log_to_driver=False)
        cfg = load_config(
            overrides=[
                "run.device=cpu",
                "cluster.engine_resources={duet_engine: 1}",
                "cluster.learner_resources={duet_learner: 1}",
                "cluster.placement_timeout_s=5",
                "rewards.num_workers=1",
            ]
        )
        plan = make_plan(cfg, cluster_gpus=0)
        learner_pg = placement_group(plan.learner_bundles)
        assert learner_pg.wait(60)
        fleet = RolloutFleet(cfg, plan, str(tiny_model))
        fleet.launch(1)  # its placement group is on the doomed node, the only one with duet_engine
        learner: dict = {}

        def start_learner() -> None:
            try:
                learner["group"] = LearnerGroup(cfg, str(tiny_model), learner_pg, "cpu", 1)
            except BaseException as e:
                learner["error"] = e

        starting = threading.Thread(target=start_learner, daemon=True)
        starting.start()  # its rank goes to its bundle, on the doomed node

        t_kill = time.monotonic()
        cluster.remove_node(doomed, allow_graceful=False)  # raylet and workers SIGKILLed
        listed = {n["NodeManagerAddress"]: n["Alive"] for n in ray.nodes()}
        assert listed.get(DOOMED) is True, listed  # Ray has not noticed yet: the race is on
        aim = NodeAffinitySchedulingStrategy(doomed.node_id, soft=True)

        # So is a tool worker (its pool on the survivor, the worker aimed at the lost node).
        tools = ToolPool.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(survivor.node_id, soft=False)
        ).remote(
            EnvConfig(name="calculator").model_dump(), 1, None, "node-loss", {"scheduling_strategy": aim}
        )
        tools_ready = tools.ready.remote(120)

        # A reward worker sent to the lost node (Ray forwards a lease to the node an affinity names while it
        # lists it alive) dies with it, and is started again elsewhere.
        pool = RewardPool(cfg.rewards, actor_options={"scheduling_strategy": aim}, ready_timeout_s=120)
        print(f"reward pool ready {time.monotonic() - t_kill:.1f} s after the node was killed")
        assert [r["reason"] for r in pool.replaced] == [f"lost with its node {DOOMED} before it was ready"]
        [result] = pool.score([VerifyItem("so \\boxed{2}", "2")])
        assert result.reward == 1.0, result

        [info] = ray.get(tools_ready, timeout=150)
        events = ray.get(tools.new_events.remote(0))
        assert [e["reason"] for e in events] == [f"lost with its node {DOOMED} before it was ready"], events
        assert ray.get(tools.start.remote([Prompt(0, "2*3=", "6")])) == [{}] and info["pid"]

        # The engine and the learner rank placed on it: no node left holds their resources, and the error
        # says which node was lost.
        with pytest.raises(PreflightError) as engine_error:
            fleet.wait_ready()
        assert f"RolloutEngine 0 was lost with its node {DOOMED} before it was ready" in str(
            engine_error.value
        )
        starting.join(timeout=120)
        assert "group" not in learner, "the learner started without its node"
        assert isinstance(learner.get("error"), PreflightError), learner
        assert f"learner rank 0 was lost with its node {DOOMED} before it was ready" in str(learner["error"])
        print(f"everything decided {time.monotonic() - t_kill:.1f} s after the node was killed")

        # An actor that waits for a bundle no alive node can hold fails nothing in Ray (its group stays
        # pending, or RESCHEDULING after a node loss): start-up stops it after cluster.placement_timeout_s.
        unplaced = placement_group([{"CPU": 1, "duet_learner": 1}])
        t_wait = time.monotonic()
        with pytest.raises(PreflightError, match=r"learner rank 0 waits for its bundle .*duet_learner"):
            LearnerGroup(cfg, str(tiny_model), unplaced, "cpu", 1)
        assert time.monotonic() - t_wait < 60
        remove_placement_group(unplaced)
    finally:
        for part in (pool, fleet):
            if part is not None:
                part.shutdown()
        if tools is not None:
            ray.kill(tools)
        if learner_pg is not None:
            try:
                remove_placement_group(learner_pg)
            except Exception:
                pass
        if starting.ident is not None:  # started
            starting.join(timeout=30)
        # ray.shutdown while another thread still waits in Ray can block for good: the nodes are removed
        # either way, which ends that wait.
        if not starting.is_alive():
            ray.shutdown()
        cluster.shutdown()

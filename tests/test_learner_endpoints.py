"""Learner rank 0 listens, so the rendezvous addresses are taken on its node, by it.

Two rendezvous: the learner's process group (DeepSpeed) and the weight transfer to the engines (rank 0
is the transfer group's master). A two-node Ray cluster on one machine whose nodes have distinct
addresses (head: the machine's address, no CPUs, like the shipped cluster files; worker: 127.0.0.2) shows
where each address comes from: a task scheduled without a strategy lands on the driver's node, an
address taken there names a host where rank 0 does not run. (The head keeps the machine's own address:
Ray rewrites a 127.0.0.1 bootstrap address to it, so a head on 127.0.0.1 cannot be joined.)
"""

from __future__ import annotations

import psutil
import pytest

pytestmark = pytest.mark.integration

WORKER = "127.0.0.2"  # any 127/8 address reaches this machine through the loopback device


@pytest.fixture(scope="module")
def two_node_ray():
    import ray
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    # The head wrote its address where a plain `ray.init()` looks for a cluster to join: take it back, so
    # that no other Ray user on this machine (or a later test's local Ray) joins or trips over this one.
    reset_ray_address()
    try:
        cluster.add_node(num_cpus=3, node_ip_address=WORKER)
        ray.init(address=cluster.address, log_to_driver=False)
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()


def _listens(pid: int, port: int) -> bool:
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr.port == port
        for c in psutil.Process(pid).net_connections(kind="tcp")
    )


@pytest.mark.timeout(240)
def test_rendezvous_on_rank0_node(two_node_ray, tiny_model):
    ray = two_node_ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.config import load_config
    from learner.group import LearnerGroup

    @ray.remote(num_cpus=0)
    class RendezvousPeer:
        """An engine's side of the weight-transfer rendezvous, reduced to joining the group."""

        def init_weight_transfer_engine(self, info: dict) -> None:
            from actors.weight_transport import open_group

            self.info = info
            self.store, self.group = open_group(
                info["master_address"], info["master_port"], info["rank_offset"], info["world_size"], 60.0
            )

        def given(self) -> dict:
            return self.info

    assert ray.util.get_node_ip_address() != WORKER  # the driver's node is not the learner's
    # The stand-in engine joins the gloo group (it has no node of its own to share memory with).
    cfg = load_config(overrides=["learner.num_ranks=2", "cluster.weight_transport=network"])
    pg = placement_group([{"CPU": 1}] * 2)
    ray.get(pg.ready(), timeout=60)
    learner = LearnerGroup(cfg, str(tiny_model), pg, "cpu", 1)
    try:
        rank0 = ray.get(learner.workers[0].ready.remote())
        rank0_address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == rank0["node"])
        assert rank0_address == WORKER

        # The weight transfer: the engines are told rank 0's node, at a port rank 0 binds.
        peer = RendezvousPeer.remote()
        learner.init_broadcast([peer], 1, "duet_host")
        given = ray.get(peer.given.remote())
        assert given["master_address"] == rank0_address, given
        assert _listens(rank0["pid"], given["master_port"]), "rank 0 does not listen on the transfer port"

        # The process group: its store listens in rank 0's process, at rank 0's node address.
        address, port = learner.process_group_endpoint
        assert address == rank0_address
        assert _listens(rank0["pid"], port), "rank 0 does not listen on the process group's port"
    finally:
        learner.shutdown()
        remove_placement_group(pg)

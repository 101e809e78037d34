"""Preflight: compare the placement plan with what the cluster has, before anything waits on it.

Without it a plan the cluster cannot hold (`run.device=cuda` on a machine without GPUs, a
tensor-parallel engine wider than any node) leaves `placement_group(...).ready()` waiting forever with
no message. Here the plan is packed, bundle by bundle, onto the alive nodes' total resources (an
engine's bundle must fit one node; learner ranks may spread), and what does not fit is named with
each node's resources. Every placement wait then has a deadline (`cluster.placement_timeout_s`).

The run directory is checked from learner rank 0's node: checkpoints are written there by the
learner, and read back by the driver, so both must see the same folder (shared storage).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import Config
from cluster.placement import COLOCATED_SHARE, Plan, make_plan, ray_cpus_needed


class PreflightError(RuntimeError):
    """The cluster cannot run this plan; the message names what is missing."""


@dataclass
class Node:
    address: str
    resources: dict[str, float]  # totals: what the node was started with
    node_id: str = ""


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster, with their total resources."""
    return [
        Node(n["NodeManagerAddress"], dict(n.get("Resources", {})), n["NodeID"])
        for n in ray.nodes()
        if n.get("Alive")
    ]


def local_nodes(cfg: Config) -> list[Node]:
    """The node a local Ray would start on this machine (cluster/runtime.py's init_ray)."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    return [
        Node(
            "this machine", {"CPU": float(max(os.cpu_count() or 1, ray_cpus_needed(cfg))), "GPU": float(gpus)}
        )
    ]


def node_addresses() -> dict[str, str]:
    """Ray node id -> the node's address (for actors.json)."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: (int(v) if float(v).is_integer() else v) for k, v in sorted(resources.items())}
    shown = {k: v for k, v in shown.items() if k in ("CPU", "GPU") or not _internal(k)}
    return "{" + ", ".join(f"{k}: {v}" for k, v in shown.items()) + "}"


def _internal(key: str) -> bool:
    return (
        key.startswith("node:")
        or key in ("memory", "object_store_memory")
        or key.startswith("accelerator_type")
    )


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


def shortfalls(plan: Plan, nodes: list[Node]) -> list[str]:
    """What the plan needs that these nodes do not have; empty when it fits.

    First-fit decreasing: the biggest bundles first, each onto the node with the most room left
    (GPUs, then CPUs). A bundle is indivisible (Ray places it on one node).
    """
    units = [(f"RolloutEngine {i}", b) for i, b in enumerate(plan.engine_bundles)]
    units += [(f"learner rank {i}", b) for i, b in enumerate(plan.learner_bundles)]
    units.sort(key=lambda u: (-u[1].get("GPU", 0.0), -u[1].get("CPU", 0.0)))
    free = [dict(n.resources) for n in nodes]
    missing = []
    for label, need in units:
        fitting = [j for j, f in enumerate(free) if _fits(need, f)]
        if not fitting:
            missing.append(f"{label} needs {_fmt(need)} on one node")
            continue
        j = max(fitting, key=lambda j: (free[j].get("GPU", 0.0), free[j].get("CPU", 0.0)))
        for key, v in need.items():
            free[j][key] = free[j].get(key, 0.0) - v
    if not missing:
        return []
    total_need: dict[str, float] = {}
    for _, need in units:
        for key, v in need.items():
            total_need[key] = total_need.get(key, 0.0) + v
    total_have: dict[str, float] = {}
    for n in nodes:
        for key, v in n.resources.items():
            total_have[key] = total_have.get(key, 0.0) + v
    short = {k: v - total_have.get(k, 0.0) for k, v in total_need.items() if v > total_have.get(k, 0.0)}
    lines = [
        f"the plan ({plan.device}) needs {_fmt(total_need)} in all"
        + (f"; missing {_fmt(short)}" if short else "; enough in all, but not on single nodes"),
        *missing,
        "nodes: " + "; ".join(f"{n.address} {_fmt(n.resources)}" for n in nodes),
    ]
    return lines


def check_plan(
    cfg: Config, connected: bool | None = None, with_learner: bool = True
) -> tuple[Plan, list[str]]:
    """The plan, resolved against the cluster (or the local machine when no Ray is connected), and
    the warnings. Raises PreflightError when the cluster cannot hold it (a warning with autoscaling).
    `with_learner=False`: the engines alone (`duet eval`)."""
    connected = ray.is_initialized() if connected is None else connected
    nodes = cluster_nodes() if connected else local_nodes(cfg)
    gpus = sum(n.resources.get("GPU", 0.0) for n in nodes)
    plan = make_plan(cfg, cluster_gpus=gpus)
    if not with_learner:
        plan.learner_bundles = []
    problems = shortfalls(plan, nodes)
    if problems and not cfg.cluster.autoscaling:
        where = "the Ray cluster" if connected else "this machine (a local Ray)"
        requested = "" if cfg.run.device == "auto" else f" (run.device={cfg.run.device})"
        unheld = [
            f"cluster.{field} asks for {key!r}, which no node offers (`ray start --resources`)\n"
            for field in ("engine_resources", "learner_resources")
            for key in getattr(cfg.cluster, field)
            if not any(n.resources.get(key) for n in nodes)
        ]
        raise PreflightError(
            f"{where} cannot hold the placement plan{requested}:\n  "
            + "\n  ".join(problems)
            + "\n"
            + "".join(unheld)
            + "Fewer engines/ranks (rollout.num_engines, learner.num_ranks), a smaller "
            "rollout.gpus_per_engine, another run.device, or more nodes; set cluster.autoscaling=true "
            "when the cluster adds nodes on demand."
        )
    warnings = [f"waiting for the autoscaler: {p}" for p in problems]
    if plan.colocated and with_learner:
        warnings += check_colocated_memory(cfg, connected)
    return plan, warnings


@ray.remote(num_cpus=0)
def _gpu_memory_bytes() -> int | None:
    """On a GPU node (scheduled with the colocated share of a GPU): the memory of the GPU Ray gave it."""
    try:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    except Exception:  # no CUDA build, a driver problem: the caller says the check did not run
        return None


def gpu_memory_bytes(connected: bool, timeout_s: float = 60.0) -> int | None:
    """The memory of a GPU the colocated run would share: read on a GPU node of the cluster (a task holding
    the colocated share of a GPU), or on this machine when no Ray is connected. None: no GPU answered."""
    if not connected:
        try:
            import torch

            return (
                int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
            )
        except Exception:
            return None
    ref = _gpu_memory_bytes.options(num_gpus=COLOCATED_SHARE).remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        ray.cancel(ref, force=True)
        return None


def check_colocated_memory(cfg: Config, connected: bool) -> list[str]:
    """A colocated plan whose learner and engine cannot fit the GPU fails here, with the numbers
    (cluster/memory_plan.py); returns a warning when the GPU's memory could not be read."""
    from cluster.memory_plan import GIB, colocated_shortfall, count_parameters

    gib = cfg.cluster.gpu_memory_gib
    gpu = int(gib * GIB) if gib is not None else gpu_memory_bytes(connected)
    if gpu is None:
        return [
            "cluster.colocate: no GPU answered with its memory, so whether the learner and vLLM fit it was not "
            "checked; set cluster.gpu_memory_gib to check it"
        ]
    problem = colocated_shortfall(cfg, count_parameters(cfg.model.path), gpu)
    if problem:
        raise PreflightError(problem)
    return []


def _alive_nodes() -> str:
    """The nodes Ray lists alive, with their resource totals, for messages."""
    alive = [
        f"{n['NodeManagerAddress']} {_fmt(n.get('Resources', {}))}" for n in ray.nodes() if n.get("Alive")
    ]
    return "; ".join(alive) or "none"


def wait_placed(pg: PlacementGroup, timeout_s: float, what: str) -> None:
    """Wait for a placement group, at most `timeout_s`; past it, release it and say what was asked."""
    if pg.wait(timeout_seconds=timeout_s):
        return
    bundles = pg.bundle_specs
    remove_placement_group(pg)
    raise PreflightError(
        f"{what}: placement group {[_fmt(b) for b in bundles]} not placed within "
        f"cluster.placement_timeout_s={timeout_s:g} s (the cluster is busy or lost a node). "
        f"Alive nodes (totals): {_alive_nodes()}"
    )


class BundleWatch:
    """Bounds the wait of an actor not yet ready for its placement-group bundle once the bundle's node is lost.

    Ray places a lost node's bundles again (the group turns RESCHEDULING), and an actor that was still being
    started there may wait with them, failing nothing, for as long as no node can hold the bundle: a start-up
    without end. Made when the actor is created (its group placed), the watch remembers the bundle's node;
    `check` raises PreflightError, naming that node, once the group has stayed unplaced `timeout_s`."""

    def __init__(self, pg: PlacementGroup, bundle_index: int, timeout_s: float, what: str) -> None:
        self.pg, self.timeout_s, self.what = pg, timeout_s, what
        node_id = placement_group_table(pg).get("bundles_to_node_id", {}).get(bundle_index, "")
        self.node = node_addresses().get(node_id, node_id[:12])
        self.unplaced_since: float | None = None

    def check(self) -> None:
        state = placement_group_table(self.pg).get("state")
        if state == "CREATED":
            self.unplaced_since = None
            return
        now = time.monotonic()
        if self.unplaced_since is None:
            self.unplaced_since = now
        if now - self.unplaced_since < self.timeout_s:
            return
        lost = f"was lost with its node {self.node} before it was ready, and" if self.node else "waits for"
        raise PreflightError(
            f"{self.what} {lost} its bundle {[_fmt(b) for b in self.pg.bundle_specs]}, which no alive node "
            f"has taken within cluster.placement_timeout_s={self.timeout_s:g} s (placement group {state}). "
            f"Alive nodes (totals): {_alive_nodes()}"
        )


@ray.remote(num_cpus=0)
def _probe_run_dir(path: str, marker_name: str, expected: str) -> dict:
    """On learner rank 0's node: is the run dir the driver's (same content) and writable?"""
    out = {"address": ray.util.get_node_ip_address(), "sees_driver": False, "writable": False, "error": ""}
    try:
        out["sees_driver"] = (Path(path) / marker_name).read_text() == expected
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    try:
        probe = Path(path) / f".duet-write-probe-{secrets.token_hex(4)}"
        probe.write_text("ok")
        probe.unlink()
        out["writable"] = True
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def check_run_dir(run_dir: Path, learner_pg: PlacementGroup, timeout_s: float) -> str:
    """The run dir must be the same writable folder on learner rank 0's node as on the driver's.
    Returns rank 0's node address."""
    marker = f".duet-preflight-{secrets.token_hex(4)}"
    expected = secrets.token_hex(16)
    (run_dir / marker).write_text(expected)
    try:
        strategy = PlacementGroupSchedulingStrategy(learner_pg, placement_group_bundle_index=0)
        ref = _probe_run_dir.options(scheduling_strategy=strategy).remote(
            str(run_dir.resolve()), marker, expected
        )
        try:
            seen = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PreflightError(
                f"run dir {run_dir}: learner rank 0's node did not answer within {timeout_s:g} s"
            ) from None
    finally:
        (run_dir / marker).unlink(missing_ok=True)
    if not (seen["sees_driver"] and seen["writable"]):
        problem = "cannot write there" if seen["sees_driver"] else "does not see the driver's folder there"
        raise PreflightError(
            f"run dir {run_dir.resolve()}: learner rank 0's node ({seen['address']}) {problem}"
            + (f" ({seen['error']})" if seen["error"] else "")
            + ". Checkpoints are written by learner rank 0 and read by the driver: put the run dir on "
            "storage every node mounts at the same path (--run-dir / run.run_dir)."
        )
    return seen["address"]


def dry_run_plan(cfg: Config) -> tuple[Plan, list[str]]:
    """`duet train --dry-run`: the plan checked against the cluster RAY_ADDRESS names (connected only
    for the check), or against this machine when a run would start a local Ray."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or address.startswith(("http://", "https://")):
        # No cluster to ask (an http address is the Jobs API, which `duet submit` uses, not the driver).
        return check_plan(cfg, connected=False)
    if ray.is_initialized():
        return check_plan(cfg, connected=True)
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        return check_plan(cfg, connected=True)
    finally:
        ray.shutdown()

"""A multi-node Ray cluster on one machine: every node in its own Linux network namespace.

Each node gets its own address (a veth pair on a bridge of the test's own, in 10.77.X.0/24 with X
picked free on this machine), so anything that binds or names a host (the weight-transfer rendezvous,
the Jobs API, object transfers) really crosses between addresses, as on a cluster. The head runs with
`--num-cpus=0` (like cluster/ray-cluster.yaml's head, it hosts the driver only); workers are started
with `ray start --address=HEAD:6379` and custom resources that a run can steer bundles to. Ray's token
authentication is on. Needs root and iproute2 (`.ci/run` installs it).

Inside a node its host name resolves to the node's address (an /etc/netns/NS/hosts of its own), as on
a real cluster. Teardown goes by namespace: `ip netns pids NS` lists exactly the processes started in it, which are
killed by id; `ray stop` (which finds processes by name machine-wide) is never used, so other Ray
instances on the machine live on. Killing a node whole (`kill_node`) is the same step mid-run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SUBNET_PREFIX = "10.77"
GCS_PORT = 6379
DASHBOARD_PORT = 8265


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_available() -> str | None:
    """Why a namespace cluster cannot be built here (None when it can)."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _free_subnet() -> int:
    """A third octet X with no 10.77.X.0/24 address on this machine (another test's bridge)."""
    used = _ip("-4", "-o", "addr").stdout
    for _ in range(200):
        x = secrets.randbelow(254) + 1
        if f" {SUBNET_PREFIX}.{x}." not in used:
            return x
    raise RuntimeError("no free 10.77.X.0/24 subnet")


@dataclass
class SimNode:
    name: str  # "head", "worker1", ...
    netns: str
    address: str
    temp_dir: str
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: int = 0
    num_gpus: int = 0  # logical: Ray counts them, nothing checks they exist
    # Folders this node sees as its own empty tmpfs (a mount namespace): storage that is not shared.
    private_dirs: list[str] = field(default_factory=list)


@dataclass
class SimCluster:
    prefix: str
    bridge: str
    token: str
    env: dict[str, str]  # for clients (duet submit) and for `ip netns exec` commands
    nodes: list[SimNode] = field(default_factory=list)

    @property
    def head(self) -> SimNode:
        return self.nodes[0]

    @property
    def workers(self) -> list[SimNode]:
        return self.nodes[1:]

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}"

    def node(self, address: str) -> SimNode:
        return next(n for n in self.nodes if n.address == address)

    def pids(self, node: SimNode) -> list[int]:
        out = _ip("netns", "pids", node.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, node: SimNode) -> int:
        """Every process in the node's namespace (raylet, workers, vLLM, DeepSpeed), SIGKILL by id."""
        killed = 0
        for _ in range(20):
            pids = self.pids(node)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.2)
        return killed

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the head's state API reports them (through the token)."""
        r = httpx.get(
            f"{self.dashboard}/api/v0/nodes",
            params={"limit": 100, "detail": "true"},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        r.raise_for_status()
        rows = r.json()["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]

    def exec(self, node: SimNode, *cmd: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """Run a command on a node (inside its namespace), with the cluster's token in its environment."""
        return subprocess.run(["ip", "netns", "exec", node.netns, *cmd], env=env or self.env, **kw)


def _ray_start(cluster: SimCluster, node: SimNode, head: bool, system_config: dict | None = None) -> None:
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray_bin, "start", "--disable-usage-stats", f"--temp-dir={node.temp_dir}",
        f"--node-ip-address={node.address}", f"--num-cpus={node.num_cpus}", f"--num-gpus={node.num_gpus}",
        "--object-store-memory=200000000",
    ]  # fmt: skip
    if head:
        cmd += [
            "--head", f"--port={GCS_PORT}", "--include-dashboard=true", "--dashboard-host=0.0.0.0",
            f"--dashboard-port={DASHBOARD_PORT}",
        ]  # fmt: skip
        if system_config:
            cmd += [f"--system-config={json.dumps(system_config)}"]
    else:
        cmd += [f"--address={cluster.head.address}:{GCS_PORT}"]
    if node.resources:
        cmd += [f"--resources={json.dumps(node.resources)}"]
    if node.private_dirs:
        mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(d)}" for d in node.private_dirs)
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'{mounts} && exec "$@"',
            "sh",
            *cmd,
        ]
    log = Path(node.temp_dir) / "ray-start.log"
    with log.open("w") as f:
        proc = cluster.exec(node, *cmd, stdout=f, stderr=subprocess.STDOUT, timeout=240)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start on {node.name} failed:\n{log.read_text()[-3000:]}")


def _teardown(cluster: SimCluster) -> None:
    for node in reversed(cluster.nodes):
        cluster.kill_node(node)
    for node in cluster.nodes:
        _ip("netns", "del", node.netns, check=False)
        shutil.rmtree(f"/etc/netns/{node.netns}", ignore_errors=True)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
    _ip("link", "del", cluster.bridge, check=False)


@contextlib.contextmanager
def sim_cluster(
    workers: list[dict[str, float]],
    worker_cpus: int = 4,
    worker_gpus: list[int] | None = None,
    private_dirs: dict[int, list[str]] | None = None,
    start_timeout_s: float = 300,
    system_config: dict | None = None,
):
    """A head (no CPUs, no GPUs) and one worker node per entry of `workers` (its custom resources),
    with `worker_cpus` CPUs and `worker_gpus[i]` logical GPUs each. `private_dirs[i]`: folders that
    node i (0: the head, 1: worker1, ...) sees as empty storage of its own, not shared. `system_config`:
    Ray's system settings for the cluster (`ray start --head --system-config`), e.g. how long its GCS takes
    to declare a lost node dead (health_check_period_ms × health_check_failure_threshold)."""
    why_not = netns_available()
    if why_not:
        raise RuntimeError(why_not)
    prefix = f"dcs{secrets.token_hex(2)}"  # unique per cluster; interface names stay under 15 chars
    x = _free_subnet()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The job's `python` is the head's PATH's: this interpreter first. The token reaches the nodes,
    # their workers, the job driver and the clients through the environment.
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    cluster = SimCluster(prefix=prefix, bridge=f"{prefix}br", token=token, env=env)
    try:
        _ip("link", "add", cluster.bridge, "type", "bridge")
        _ip("addr", "add", f"{SUBNET_PREFIX}.{x}.254/24", "dev", cluster.bridge)
        _ip("link", "set", cluster.bridge, "up")
        gpus = worker_gpus or [0] * len(workers)
        private = private_dirs or {}
        specs = [("head", {}, 0, 0)] + [
            (f"worker{i + 1}", r, worker_cpus, gpus[i]) for i, r in enumerate(workers)
        ]
        for i, (name, resources, cpus, n_gpus) in enumerate(specs):
            ns, outside, inside = f"{prefix}n{i}", f"{prefix}v{i}", f"{prefix}c{i}"
            address = f"{SUBNET_PREFIX}.{x}.{i + 1}"
            # Short temp dirs: Ray's socket paths must stay under ~107 characters.
            temp_dir = f"/tmp/{prefix}-{i}"
            os.makedirs(temp_dir, exist_ok=True)
            cluster.nodes.append(
                SimNode(name, ns, address, temp_dir, dict(resources), cpus, n_gpus, private.get(i, []))
            )
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", cluster.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            # `ip netns exec` bind-mounts /etc/netns/NS/* over /etc/*: inside the node the hostname
            # resolves to the node's own address, as on a real cluster. (Gloo advertises the address its
            # host name resolves to; the machine's 127.0.0.1 would send every peer to itself.)
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(
                f"127.0.0.1 localhost\n{address} {socket.gethostname()}\n"
            )
        _ray_start(cluster, cluster.head, head=True, system_config=system_config)
        deadline = time.monotonic() + start_timeout_s
        for node in cluster.workers:
            _ray_start(cluster, node, head=False)
        while True:
            try:
                if len(cluster.alive_nodes()) == len(cluster.nodes):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulated cluster did not come up within {start_timeout_s:g} s")
            time.sleep(2)
        yield cluster
    finally:
        _teardown(cluster)

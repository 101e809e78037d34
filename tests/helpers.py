"""What several test files share: paths, the `duet` command line, free ports, polling, the reward server,
the fixtures that mark their tests `integration`, and the custom verifiers a sandbox child imports.

Test files import from here, never from each other or from conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from envs.calculator import Calculator

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")

# ---------------------------------------------------------------- fixtures that start processes

# Names of fixtures that start Ray, a server or a subprocess. conftest.py marks every test that uses one
# of them (directly or through another fixture) `integration`; `--fast` then leaves those tests out.
INTEGRATION_FIXTURES: set[str] = set()


def integration_fixture(*args: Any, **kwargs: Any) -> Any:
    """`pytest.fixture`, for a fixture that starts Ray, a server or a subprocess: every test that uses
    it is marked `integration`. Takes the same arguments (`scope=...`, `name=...`)."""

    import pytest  # here, not at the top: sandbox children import this module for its custom verifiers

    def register(fn: Callable) -> Any:
        INTEGRATION_FIXTURES.add(kwargs.get("name") or fn.__name__)
        return pytest.fixture(**kwargs)(fn)

    if args and callable(args[0]) and len(args) == 1 and not kwargs:
        return register(args[0])
    return register


# ---------------------------------------------------------------- commands, ports, polling


def duet_cmd(*args: str) -> list[str]:
    """`duet ...` through the interpreter running the tests (works without the console script on PATH)."""
    return [sys.executable, "-m", "cluster.cli", *args]


def run_duet(
    *args: str, timeout_s: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`duet ...` run to the end from the repository root; output captured as text."""
    return subprocess.run(
        duet_cmd(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
    )


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (all bound at once, so no repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def run_ranks(procs: list, timeout_s: float = 300.0) -> list[int | None]:
    """Start `procs` (multiprocessing processes, one per rank), wait for all of them within `timeout_s` in
    all, and kill the ones still running: a rank that failed leaves its peers waiting in a collective, so
    none outlives the test. Their exit codes (-9: still running at the deadline, killed)."""
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    return [p.exitcode for p in procs]


def wait_for(
    cond: Callable[[], T],
    timeout_s: float = 300.0,
    what: str = "condition",
    every_s: float = 0.2,
    proc: subprocess.Popen | None = None,
) -> T:
    """Poll `cond` until it returns something truthy, and return that; fail naming `what` at the deadline,
    or at once when `proc` (the process that should bring it about) has exited, with its stderr's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            err = err.decode(errors="replace") if isinstance(err, bytes) else err or ""
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def http_ok(url: str, headers: dict | None = None) -> bool:
    """GET `url` answers 200 (False while nothing listens there yet)."""
    import httpx

    try:
        return httpx.get(url, headers=headers, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL a run started with start_new_session (its whole process group) if it still runs."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@contextlib.contextmanager
def reward_server(
    *args: str, env: dict[str, str] | None = None, start_timeout_s: float = 90.0
) -> Iterator[str]:
    """A real `python -m rewards.server` on a free loopback port; yields its URL once /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "rewards.server", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{url}/healthz"), start_timeout_s, "the reward server to answer", proc=proc)
        yield url
    finally:
        stop(proc)


# ---------------------------------------------------------------- `duet train` as a subprocess


def start_train(run_dir: Path, *args: str, model_cache: Path) -> subprocess.Popen:
    """`duet train --run-dir run_dir ...` in a process group of its own (killing it takes its Ray along)."""
    return subprocess.Popen(
        duet_cmd("train", "--run-dir", str(run_dir), f"model.cache_dir={model_cache}", *args),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def failure_summary(stderr: str, tail_chars: int = 3000) -> str:
    """A run's stderr cut for an assertion message: every traceback frame in the project's own files (a
    Ray error's remote traceback fills the tail, and the frame that called it is far above), then the tail."""
    own = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip().startswith(f'File "{REPO}') and "/.venv/" not in line
    ]
    return "project frames:\n  " + "\n  ".join(own) + f"\n...\n{stderr[-tail_chars:]}"


def running(p: subprocess.Popen, cond):
    """`cond` for wait_for, failing at once when the run has exited (instead of waiting out the deadline)."""

    def check():
        if p.poll() is not None:
            raise AssertionError(f"the run exited ({p.returncode}): {failure_summary(p.stderr.read())}")
        return cond()

    return check


def engine_pid(run_dir: Path, slot: int = 0) -> int:
    """The process id of the engine actor in fleet slot `slot`, from the run's actors.json."""
    return json.loads((run_dir / "actors.json").read_text())["engines"][slot]["pid"]


def descendants(pid: int) -> dict[int, str]:
    """Every process under `pid` (children, their children...) with its title (argv[0])."""
    parent_of, title = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # comm may hold spaces
        title[int(entry.name)] = argv0.strip()
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, parent in parent_of.items():
            if parent == p and child not in found:
                found[child] = title[child]
                todo.append(child)
    return found


def vllm_process(actor_pid: int, title: str) -> int:
    """The pid of the vLLM process titled `title` (`VLLM::Worker`, `VLLM::EngineCore`) under the engine
    actor `actor_pid`: vLLM sets its processes' titles."""
    found = [p for p, t in descendants(actor_pid).items() if t.startswith(title)]
    assert len(found) == 1, (title, descendants(actor_pid))
    return found[0]


def kill_leftovers(pids: list[int]) -> None:
    """Processes of ours that a SIGKILL orphaned (vLLM's children of a killed actor), if any lived on."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def steps_done(run_dir: Path) -> int:
    """Steps in the run's metrics.jsonl so far (0 before the file exists or while a line is half written)."""
    from cluster.metrics import read_metrics

    try:
        return len(read_metrics(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def control_auth(run_dir: Path) -> tuple[str, dict[str, str]]:
    """The running launch's control API (RUN_DIR/control.json): its URL and the header with its token."""
    control = json.loads((run_dir / "control.json").read_text())
    return control["url"], {"Authorization": f"Bearer {control['token']}"}


def paused_after(
    run_dir: Path, step: int | None, p: subprocess.Popen | None = None, timeout_s: float = 300.0
) -> tuple[str, dict[str, str]]:
    """Wait until the launch's loop holds paused with `step` done (None: before its first step, as
    `control.start_paused` holds it); fail at once when `p` has exited, or when a launch that has no `p`
    (a Ray job) has ended (RUN_DIR/timeline.jsonl is written at its end). Returns (url, auth header).

    With `POST /resume {"steps": N}` this puts a fault between two given steps, however fast they are."""
    import httpx

    def held():
        if p is None:
            assert not (run_dir / "timeline.jsonl").exists(), "the run ended"
        if not (run_dir / "control.json").exists():
            return None
        url, auth = control_auth(run_dir)
        with contextlib.suppress(httpx.HTTPError):
            status = httpx.get(f"{url}/status", timeout=10).json()
            if status.get("state") == "paused" and status.get("step") == step:
                return url, auth
        return None

    what = "the run paused before its first step" if step is None else f"the run paused after step {step}"
    return wait_for(held if p is None else running(p, held), timeout_s=timeout_s, what=what, every_s=0.5)


# ---------------------------------------------------------------- custom verifiers (run in a sandbox child)
# The sandbox child imports these by path (`tests.helpers:custom_...`), exactly as a user's function.

CUSTOM_DISPATCH = "tests.helpers:custom_dispatch"


def custom_dispatch(prompt: str, completion: str, reference: str) -> object:
    """One custom verifier that behaves as `custom_<prompt>`: lets one sandbox try every behaviour."""
    return globals()[f"custom_{prompt}"](prompt, completion, reference)


def custom_same_length(prompt: str, completion: str, reference: str) -> tuple[float, dict]:
    return float(len(completion) == len(reference)), {"n": len(completion), "prompt": prompt}


def custom_partial(prompt: str, completion: str, reference: str) -> tuple[float, dict]:
    return 0.5, {"reason": "partial"}


def custom_nan(prompt: str, completion: str, reference: str) -> float:
    return math.nan


def custom_raises(prompt: str, completion: str, reference: str) -> float:
    raise ValueError("boom")


def custom_sleeps(prompt: str, completion: str, reference: str) -> float:
    time.sleep(3600)
    return 1.0


def custom_spins(prompt: str, completion: str, reference: str) -> float:
    while True:  # pure CPU, like sympy stuck in C: only a kill (or RLIMIT_CPU) stops it
        pass


def custom_naps(prompt: str, completion: str, reference: str) -> float:
    """A slow but well-behaved verifier (used by the pool tests to make batches last, CPU-free)."""
    time.sleep(0.25)
    return 1.0


def custom_hogs_memory(prompt: str, completion: str, reference: str) -> float:
    return float(len(bytearray(8 << 30)))  # 8 GiB: far past the child's RLIMIT_AS


def custom_exits(prompt: str, completion: str, reference: str) -> float:
    os._exit(3)


def custom_prints(prompt: str, completion: str, reference: str) -> float:
    print('{"id": 1, "reward": 99.0, "reason": "forged"}')  # must not reach the protocol pipe
    return 1.0


def custom_kills_parent(prompt: str, completion: str, reference: str) -> float:
    """Used by the pool tests: SIGKILLs the process that owns the sandbox (the RewardWorker actor).

    The child's parent is the sandbox's fork server; the owner is the fork server's parent."""
    if "KILL-PARENT" in completion:
        with open(f"/proc/{os.getppid()}/stat") as f:
            owner = int(f.read().rsplit(")", 1)[1].split()[1])
        os.kill(owner, signal.SIGKILL)
        time.sleep(3600)
    return 1.0


def custom_environment(prompt: str, completion: str, reference: str) -> tuple[float, dict]:
    """Reports the names in the sandbox child's environment (the secrets test reads them)."""
    return 1.0, {"names": sorted(os.environ)}


# ---- helpers: a real engine, and the learner's sender in the test process on a HF model ----
def start_engine(ray, tiny_model, core: str = "0"):
    from actors.rollout_engine import RolloutEngine
    from cluster.placement import cpu_engine_env

    engine = RolloutEngine.options(
        runtime_env={"env_vars": cpu_engine_env(core)},
        max_concurrency=8,
    ).remote(0, str(tiny_model))
    ray.get(engine.ready.remote())
    return engine


def open_sender(model, client, bucket_bytes: int = 1 << 16, timeout_s: float = 60.0):
    """Learner rank 0's duet_host sender in the test process, over `model` (a Hugging Face model)."""
    from learner.weight_sender import (
        DuetHostTrainerInitInfo,
        DuetHostTrainerWeightTransferEngine,
        ZeroModuleSource,
    )

    info = DuetHostTrainerInitInfo(
        master_address="127.0.0.1",
        master_port=free_port(),
        world_size=2,
        rank=0,
        bucket_bytes=bucket_bytes,
        timeout_s=timeout_s,
    )
    return DuetHostTrainerWeightTransferEngine.trainer_init(
        info, client=client, source=ZeroModuleSource(model, 0)
    )


def assert_samples_from(ray, engine, model, version: int, prompts: int) -> None:
    """The engine's log-probs of its own samples equal a transformers forward of `model` (within 1e-3),
    and every sample was generated under `version`."""
    import torch

    from cluster.config import SamplingConfig
    from cluster.records import Prompt

    batch = [Prompt(i, f"{i}+{i + 1}=", str(2 * i + 1)) for i in range(prompts)]
    sampling = SamplingConfig(temperature=1.0, max_tokens=8)
    for group in ray.get(engine.generate.remote(batch, 2, sampling)):
        for c in group:
            ids = torch.tensor([c.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            p = len(c.prompt_token_ids)
            hf = torch.tensor([logp[p - 1 + i, t].item() for i, t in enumerate(c.token_ids)])
            assert c.version_start == c.version_end == version
            assert torch.allclose(hf, torch.tensor(c.logprobs), atol=1e-3), (hf, c.logprobs)


def kill_run_and_its_ray(proc: subprocess.Popen, token: str) -> None:
    """Kill `proc`'s process group, then every process whose environment holds `token` as
    RAY_AUTH_TOKEN: Ray's workers sit in process groups of their own, and the test's own token marks
    them as ours. Other Ray instances on the machine live on."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    mark = f"RAY_AUTH_TOKEN={token}".encode()
    for pid_dir in Path("/proc").iterdir():
        try:
            if pid_dir.name.isdigit() and mark in (pid_dir / "environ").read_bytes().split(b"\0"):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------- Ray's actor table


def ray_actors(class_name: str, state: str = "ALIVE") -> list[dict]:
    """The connected Ray's actors of `class_name` in `state`, as Ray's state API (the dashboard's Actors
    page, `ray list actors --detail`) lists them: each with its `name` and `repr_name`. Needs the dashboard."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name), ("state", "=", state)]
    return [a.__dict__ for a in list_actors(filters=filters, detail=True, limit=1000, timeout=60)]


# ---- docs/environments.md's example environment (tests/test_envs.py and tests/test_tools_engine.py run it) ----
def docs_environment_example(folder: Path) -> tuple[Path, str]:
    """Write the page's complete custom environment (its first python block under "Your own environment") to
    folder/my_envs.py, as a user would; returns the file and its code."""
    text = (REPO / "docs" / "environments.md").read_text()
    section = text[text.index("## Your own environment") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    path = folder / "my_envs.py"
    path.write_text(code)
    return path, code


class GatedCalculator(Calculator):
    """The calculator, except that each call first writes `<gate>.arrived` and then waits until `<gate>.open`
    exists, where <gate> is the prompt's `source`: a test can act while an episode is inside its tool call
    (tests/test_tools_engine.py kills the engine there). env.name=tests.helpers:GatedCalculator."""

    def start(self, prompt):
        return {"gate": prompt.source}

    def step(self, state, turn):
        Path(state["gate"] + ".arrived").touch()
        deadline = time.monotonic() + 120
        while not Path(state["gate"] + ".open").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return super().step(state, turn)

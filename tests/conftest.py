"""Shared fixtures (a tiny model built offline once per session, a local Ray) and the two test tiers.

Tiers. A test is `integration` when it starts Ray, a server or a subprocess. It gets the marker in one
of three ways, and the first two are the ones to use:
- it uses, directly or through another fixture, a fixture made with `tests.helpers.integration_fixture`
  (`local_ray` below, the reward-server, sandbox and control-server fixtures of the test files):
  `pytest_collection_modifyitems` below marks it, so a new test on such a fixture needs no marker;
- its module sets `pytestmark = pytest.mark.integration`, or it carries `@pytest.mark.integration`
  (for tests that start a process in their own body).
`pytest --fast` (`./scripts/test.sh --fast`) deselects every `integration` test and turns on guards for
the whole session: `subprocess.Popen` (so `subprocess.run` too), `os.fork`/`os.posix_spawn`/`os.system`,
`multiprocessing` starts, `ray.init` and `socket.listen` raise `FastTierViolation`. A test that still
reaches one is mis-marked and fails, even when the code under test catches the error. Without `--fast`
nothing is guarded and every test runs (what `.ci/run` does).
"""

from __future__ import annotations

import faulthandler
import importlib.abc
import importlib.util
import multiprocessing.process
import os
import platform
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import INTEGRATION_FIXTURES, integration_fixture


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast",
        action="store_true",
        default=False,
        help="the fast tier: leave out `integration` tests; starting Ray, a server or a process raises",
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` filters, so `-m "not integration"` sees these markers too
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    if config.getoption("fast"):
        dropped = [item for item in items if item.get_closest_marker("integration")]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if not item.get_closest_marker("integration")]


# ---------------------------------------------------------------- the fast tier's guards


class FastTierViolation(RuntimeError):
    """Raised when a test in the fast tier starts Ray, a server or a process."""


_violations: list[str] = []


def _refuse(what: str) -> None:
    message = (
        f"{what} in the fast tier (--fast). A test that starts Ray, a server or a subprocess must be "
        "marked integration: use a fixture made with tests.helpers.integration_fixture, or "
        "@pytest.mark.integration / a module-level pytestmark."
    )
    # The call site goes with the record: the code under test may catch the error and lose its traceback.
    where = "".join(traceback.format_stack(limit=12)[:-1])
    _violations.append(f"{message}\nCalled from:\n{where}")
    raise FastTierViolation(message)


def _guard_ray(ray: ModuleType) -> None:
    def init(*args: object, **kwargs: object) -> None:
        _refuse("ray.init()")

    ray.init = init


class _GuardRayOnImport(importlib.abc.MetaPathFinder):
    """Guards `ray.init` when `ray` is first imported: importing Ray up front would cost every run seconds."""

    def find_spec(
        self, name: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "ray":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("ray")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_guard(module: ModuleType) -> None:
            exec_module(module)
            _guard_ray(module)

        spec.loader.exec_module = exec_and_guard
        return spec


def _install_guards() -> None:
    # The standard library answers platform.platform()/processor() by running `uname -p` once and
    # caching it; libraries ask at import (mlflow's telemetry, through transformers). Ask first, so that
    # probe is not taken for a test starting a process.
    platform.processor()
    # matplotlib builds its font cache by running `fc-list` the first time its font manager loads (a
    # fresh machine's first plot); build it here, before the guards, for the same reason.
    try:
        import matplotlib.font_manager  # noqa: F401
    except ImportError:
        pass

    def execute_child(self: subprocess.Popen, args: object, *rest: object, **kw: object) -> None:
        _refuse(f"subprocess.Popen({args!r})")

    def forbidden(name: str):
        def refuse(*args: object, **kwargs: object) -> None:
            _refuse(f"{name}{args!r}")

        return refuse

    def listen(self: socket.socket, *args: object) -> None:
        _refuse(f"socket.listen() on {self.getsockname()!r}")

    subprocess.Popen._execute_child = execute_child
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            setattr(os, name, forbidden(f"os.{name}"))
    multiprocessing.process.BaseProcess.start = forbidden("multiprocessing.Process.start")
    socket.socket.listen = listen
    if "ray" in sys.modules:
        _guard_ray(sys.modules["ray"])
    else:
        sys.meta_path.insert(0, _GuardRayOnImport())


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("fast"):
        _install_guards()


# A test that hangs (a Ray call that never returns, a shutdown blocked by another thread) would hold CI to its
# overall limit and print nothing: past HANG_S in one test (its fixtures included), every thread's stack goes
# to the terminal and the session ends. faulthandler's watchdog is a C thread that needs no GIL, so it also
# catches a test stuck inside C. pytest-timeout's per-test limits (signal-based) still act first where set;
# this is the net for what a signal cannot reach. scripts/test.sh hands the terminal's stderr over as
# $DUET_TEST_STDERR_FD, since pytest's output capture owns fd 2 while a test runs.
HANG_S = float(os.environ.get("DUET_TEST_HANG_S", "900"))


def _terminal_fd() -> int:
    """$DUET_TEST_STDERR_FD when this process has it open (a pytest started by a test inherits the variable,
    not the descriptor), else 2."""
    fd = int(os.environ.get("DUET_TEST_STDERR_FD", "2"))
    try:
        os.fstat(fd)
    except OSError:
        return 2
    return fd


_hang_report = open(_terminal_fd(), "w", closefd=False)  # noqa: SIM115


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=_hang_report)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """A guard hit fails the test even when the code under test caught the error (a sandbox that
    reports "could not start", a client that retries): mis-marking must never pass quietly."""
    report = yield
    if _violations:
        if report.passed:
            report.outcome = "failed"
            report.longrepr = "\n".join(_violations)
        _violations.clear()
    return report


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One cache folder for every test (and the subprocesses they start): the model is built once."""
    return Path(os.environ.get("DUET_TEST_MODEL_CACHE") or tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> Path:
    from cluster.config import Config
    from learner.tiny_model import ensure_tiny_model

    cfg = Config()  # the same key as `duet train`'s default, so subprocesses reuse the build
    return ensure_tiny_model(model_cache, cfg.model.warm_start_steps, cfg.data.synthetic_max_operand, seed=0)


@integration_fixture(scope="module")
def local_ray():
    import ray

    # address="local": a Ray of its own, even while someone's `ray start` head runs on this machine
    # (without it ray.init() joins that cluster and refuses num_cpus).
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()

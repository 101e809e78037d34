"""The test tiers themselves: a pytest run of its own, with this suite's conftest as a plugin, over a
folder of small tests that start processes with and without the marker. `--fast` must deselect the
marked ones and fail every unmarked one that starts a process, Ray or a listening socket."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration  # a pytest subprocess

TESTS = """
import multiprocessing
import socket
import subprocess

import pytest

from tests.helpers import free_port, integration_fixture


@integration_fixture
def starts_a_process():
    subprocess.run(["true"], check=True)
    yield


@integration_fixture(scope="module", name="named_fixture")
def _named():
    yield


@pytest.fixture
def through_another(starts_a_process):
    yield


def test_pure():
    assert sum([1, 2]) == 3


def test_binds_without_listening():
    assert free_port() > 0


def test_uses_integration_fixture(starts_a_process):
    pass


def test_uses_it_through_another_fixture(through_another):
    pass


def test_uses_named_fixture(named_fixture):
    pass


@pytest.mark.integration
def test_marked():
    subprocess.run(["true"], check=True)


def test_runs_a_subprocess():
    subprocess.run(["true"], check=True)


def test_swallows_the_error():
    try:
        subprocess.check_output(["true"])
    except Exception:
        pass


def test_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()


def test_starts_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False)


def test_starts_a_multiprocessing_process():
    multiprocessing.get_context("spawn").Process(target=print).start()
"""

INI = """[pytest]
markers =
    integration: starts Ray, a server or a subprocess
"""


def _pytest(folder, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.conftest",
        "-p",
        "no:cacheprovider",
        *args,
        str(folder),
    ]
    # `tests` must import from this checkout although the run's folder is elsewhere.
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_fast_tier_deselects_marked_tests_and_fails_mis_marked_ones(tmp_path):
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_sample.py").write_text(TESTS)

    listed = _pytest(tmp_path, "--collect-only", "-q", "-m", "integration")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    marked = {line.split("::")[-1] for line in listed.stdout.splitlines() if "::" in line}
    assert marked == {
        "test_uses_integration_fixture",
        "test_uses_it_through_another_fixture",
        "test_uses_named_fixture",
        "test_marked",
    }

    report = tmp_path / "report.xml"
    fast = _pytest(tmp_path, "--fast", f"--junitxml={report}")
    assert fast.returncode == 1, fast.stdout + fast.stderr
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failure = case.find("failure")
        outcomes[case.get("name")] = (
            "passed" if failure is None else failure.get("message", "") + failure.text
        )
    assert set(outcomes) == {
        "test_pure",
        "test_binds_without_listening",
        "test_runs_a_subprocess",
        "test_swallows_the_error",
        "test_listens",
        "test_starts_ray",
        "test_starts_a_multiprocessing_process",
    }, "the marked tests must be deselected"
    assert outcomes["test_pure"] == outcomes["test_binds_without_listening"] == "passed"
    for name, guarded in [
        ("test_runs_a_subprocess", "subprocess.Popen(['true'])"),
        ("test_swallows_the_error", "subprocess.Popen(['true'])"),
        ("test_listens", "socket.listen()"),
        ("test_starts_ray", "ray.init()"),
        ("test_starts_a_multiprocessing_process", "multiprocessing.Process.start"),
    ]:
        assert guarded in outcomes[name] and "must be marked integration" in outcomes[name], (
            name,
            outcomes[name],
        )

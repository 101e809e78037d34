"""The python tool's sandbox on this host (root: namespaces available): every hostile call costs one turn, an
observation that says so, never an exception; the jail that dies is replaced; a host that cannot isolate the
code is refused unless env.python_allow_unisolated says otherwise. No Ray: the sandbox is a process of ours."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cluster.config import EnvConfig
from envs.python_sandbox import NO_NAMESPACES_ENV, PythonSandbox, SandboxUnavailable
from envs.python_tool import PythonTool

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tool():
    env = PythonTool(EnvConfig(name="python", timeout_s=2.0, memory_limit_mib=256, max_output_bytes=4096))
    yield env
    env.close()


def call(tool: PythonTool, code: str):
    step = tool.step({}, f"<call>{code}</call>")
    assert step.observation.startswith("<result>") and step.observation.endswith("</result>")
    return step.observation[len("<result>") : -len("</result>")], step.error


def test_the_host_isolates_and_code_runs(tool):
    assert tool.sandbox.isolation["network"] and tool.sandbox.isolation["filesystem"], tool.sandbox.isolation
    assert call(tool, "123*45") == ("5535", False)  # the last expression's value, as a REPL shows it
    assert call(tool, "import math\nprint(math.factorial(10))\nx = 3") == ("3628800", False)
    assert call(tool, "import os; os.getuid()") == ("65534", False)  # nobody: no privilege left


def test_hostile_calls_cost_one_turn_each(tool):
    net, err = call(tool, "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)")
    assert err and "Network is unreachable" in net, net
    local, err = call(tool, "import socket; socket.create_connection(('127.0.0.1', 22), timeout=2)")
    assert err and ("unreachable" in local or "refused" in local), local
    for path in ("/etc/duet-probe", "/dev/shm/duet-probe", "/var/tmp/duet-probe", "/work/duet-probe"):
        out, err = call(tool, f"open({path!r}, 'w').write('x')")
        assert err and ("Read-only file system" in out or "Permission denied" in out), (path, out)
        assert not os.path.exists(path)
    t0 = time.monotonic()
    out, err = call(tool, "while True: pass")
    assert err and out == "error: timed out after 2 s" and time.monotonic() - t0 < 10
    out, err = call(tool, "x = bytearray(1 << 30)")
    assert err and out == "MemoryError", out
    out, err = call(tool, "1/0")
    assert err and out == "ZeroDivisionError: division by zero"
    out, err = call(tool, "print('x' * 5_000_000)")
    assert err and out.endswith("... [output cut at 4096 bytes]") and len(out) < 300
    out, err = tool.step({}, "no call at all").observation, tool.step({}, "no call").error
    assert err and out == "<result>error: no <call> in the turn</result>"
    # ... and the tool still answers after all of that
    assert call(tool, "6*7") == ("42", False)


def test_scratch_is_writable_and_gone_after_the_call(tool):
    out, err = call(
        tool, "import os\nopen('notes.txt', 'w').write('hi')\nprint(os.getcwd(), open('notes.txt').read())"
    )
    assert (out, err) == ("/tmp hi", False)
    assert call(tool, "import os; sorted(os.listdir('.'))") == ("[]", False)  # removed after the call
    # a child that escapes its process group is killed with the call
    code = "import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(600)\nprint('parent')"
    assert call(tool, code) == ("parent", False)
    others = "import os; [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())]"
    assert call(tool, others) == ("[]", False)


def test_a_dead_sandbox_process_is_replaced(tool):
    assert call(tool, "1+1") == ("2", False)
    os.killpg(tool.sandbox.pid, signal.SIGKILL)
    restarts = tool.sandbox.restarts
    assert call(tool, "2+2") == ("4", False)
    assert tool.sandbox.restarts == restarts + 1


def test_a_host_without_isolation_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setenv(NO_NAMESPACES_ENV, "1")
    with pytest.raises(SandboxUnavailable, match=r"env\.python_allow_unisolated=true"):
        PythonSandbox(timeout_s=1.0).start()
    sandbox = PythonSandbox(timeout_s=1.0, max_output_bytes=1024, allow_unisolated=True).start()
    try:
        assert sandbox.isolation == {
            "network": False,
            "filesystem": False,
            "why": f"{NO_NAMESPACES_ENV} is set",
        }
        ok = sandbox.run("print(7*6)")
        assert (ok.status, ok.output) == ("ok", "42\n")
        assert sandbox.run("while True: pass").status == "timeout"  # the limits hold either way
        assert sandbox.run("print('y' * 10**6)").status == "output_limit"
        where = sandbox.run("import os; print(os.getcwd())").output.strip()
        assert where.startswith("/tmp/duet-python-tool-") and not os.path.exists(where)  # removed after
    finally:
        sandbox.close()

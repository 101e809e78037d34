"""The python tool's sandbox: the model's code in a killable child with time, memory and output limits, no
network, and nothing writable but a scratch folder that is removed after the call.

    ToolWorker ──pipes (JSON lines)──► jail (pid 1 of its own pid, mount and network namespaces)
                                          └─ fork per call ─► child (user nobody, cwd = the scratch folder)

The jail is started once per sandbox (a fresh `python -c`, fork+exec, safe from the Ray worker's threads; the
reward sandbox does the same, rewards/sandbox.py). Before it takes a call it isolates itself:
- network: its own network namespace, which has no interface but a loopback that is down;
- files: its own mount namespace in which every mount is read-only, and a fresh tmpfs mounted on /tmp for each
  call (the scratch folder and the child's working directory) and unmounted after it, so whatever the call
  wrote is gone; the child runs as the unprivileged user `nobody`, so it cannot remount anything;
- processes: its own pid namespace with its own /proc; after each call every process left in it (a child's
  escaped descendants) is killed, and when the jail dies (killed by its worker, or its worker died) the
  kernel kills all of them.
Each call's child gets RLIMIT_AS (env.memory_limit_mib), RLIMIT_CPU (a backstop), RLIMIT_FSIZE, RLIMIT_NPROC
and RLIMIT_NOFILE; past env.timeout_s it is killed, past env.max_output_bytes of output too. Whatever happens
the call answers one result, never an exception; a jail that dies or stops answering is replaced.

These need root (CAP_SYS_ADMIN for the namespaces, CAP_SETUID for the drop to nobody). Where the host allows
them not, the sandbox refuses to start unless env.python_allow_unisolated is set; then the code runs with the
limits above but with the host's network and files (in a scratch folder that is still removed).

Because `nobody` may not be able to read the interpreter's own folders (a Python under /root), the jail
imports the standard modules a calculation uses (math, fractions, itertools ...) before it forks: the child
finds them in memory. Only plain JSON crosses the pipes; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
_BOOT = "import sys; from envs.python_sandbox import _boot; _boot(sys.argv[1])"
# Imported in the jail before any fork (see the module docstring).
PRELOADED = [
    "math",
    "cmath",
    "fractions",
    "decimal",
    "numbers",
    "statistics",
    "random",
    "itertools",
    "functools",
    "operator",
    "collections",
    "heapq",
    "bisect",
    "string",
    "re",
    "json",
    "datetime",
    "textwrap",
    "copy",
    "pprint",
    "array",
    "enum",
    "dataclasses",
    "typing",
]
NOBODY = 65534
# Set (to anything): the jail behaves as on a host without namespaces (the tests' way to see the refusal).
NO_NAMESPACES_ENV = "DUET_PYTHON_TOOL_NO_NAMESPACES"
_EXTRA_WAIT_S = 5.0  # the jail's answer may come this long after a call's time limit


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot start (or cannot isolate and is not allowed to run without isolation)."""


@dataclass
class RunResult:
    status: str  # ok | error | timeout | output_limit | signal | sandbox_error
    output: str  # stdout and stderr, in order, cut to the output limit
    elapsed_s: float
    detail: str = ""  # timeout: the limit; signal: which; sandbox_error: what happened


class PythonSandbox:
    """One jail process and the calls it runs, one at a time (a ToolWorker owns one)."""

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_limit_mib: int = 512,
        max_output_bytes: int = 65536,
        allow_unisolated: bool = False,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.limits = {
            "timeout_s": float(timeout_s),
            "memory_limit_mib": int(memory_limit_mib),
            "max_output_bytes": int(max_output_bytes),
        }
        self.allow_unisolated = allow_unisolated
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.isolation: dict = {}
        self.restarts = 0
        self._next_id = 0
        self._buf = bytearray()

    # ---- lifecycle ----
    def start(self) -> PythonSandbox:
        """Start the jail and check its isolation (SandboxUnavailable when it is missing and not allowed)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        keep = ("PATH", "LANG", "LC_ALL", "PYTHONHOME", NO_NAMESPACES_ENV)
        env = {k: os.environ[k] for k in keep if k in os.environ}
        # PYTHONHASHSEED fixed: the same code prints the same (a set of strings), so a synchronous run repeats.
        env.update(
            PYTHONPATH=_REPO_ROOT, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0"
        )
        self._buf = bytearray()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, json.dumps(self.limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd="/",
            close_fds=True,
            start_new_session=True,
        )
        try:
            ready = json.loads(self._read_line(time.monotonic() + self.start_timeout_s))
        except (TimeoutError, EOFError, ValueError) as e:
            self.close()
            raise SandboxUnavailable(
                f"the python tool's sandbox did not start: {type(e).__name__}: {e}"
            ) from None
        self.isolation = ready.get("isolation", {})
        missing = [what for what in ("network", "filesystem") if not self.isolation.get(what)]
        if missing and not self.allow_unisolated:
            self.close()
            raise SandboxUnavailable(
                f"the python tool cannot isolate its code on this host (no {' and no '.join(missing)} "
                f"isolation: {self.isolation.get('why', '?')}); it needs root or CAP_SYS_ADMIN for its "
                "namespaces. Set env.python_allow_unisolated=true to run it anyway (the time, memory and "
                "output limits still hold; the network and the files do not)."
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)
        self.proc = None

    # ---- calls ----
    def run(self, code: str) -> RunResult:
        """Run `code` (its last expression's value is printed, as in a REPL); never raises. A jail found dead
        (the call's code cannot kill it: it runs as another user, in the jail's pid namespace) is replaced and
        the call run on the new one."""
        for attempt in (1, 2):
            res = self._run_once(code)
            if res.status != "sandbox_error" or not res.detail.startswith("the sandbox died") or attempt == 2:
                return res
        return res

    def _run_once(self, code: str) -> RunResult:
        t0 = time.perf_counter()
        try:
            if self.proc is None or self.proc.poll() is not None:
                if self.proc is not None:
                    self.restarts += 1  # it died since the last call: replaced
                    self.close()
                self.start()
            self._next_id += 1
            request = json.dumps({"id": self._next_id, "code": code}, ensure_ascii=True).encode() + b"\n"
            assert self.proc is not None and self.proc.stdin is not None
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
            deadline = time.monotonic() + self.limits["timeout_s"] + _EXTRA_WAIT_S
            reply = json.loads(self._read_line(deadline))
            if reply.get("id") != self._next_id:
                raise ValueError("reply out of step")
            return RunResult(
                str(reply["status"]), str(reply["output"]), float(reply["elapsed_s"]), str(reply["detail"])
            )
        except SandboxUnavailable as e:
            return RunResult("sandbox_error", "", time.perf_counter() - t0, str(e))
        except (OSError, TimeoutError, EOFError, ValueError, KeyError, TypeError) as e:
            # Dead, hung or out of step: never trusted with another call; the next call starts a new one.
            self.restarts += 1
            self.close()
            if isinstance(e, (EOFError, BrokenPipeError)):
                what = "died"
            else:
                what = "did not answer" if isinstance(e, TimeoutError) else f"failed ({type(e).__name__})"
            return RunResult("sandbox_error", "", time.perf_counter() - t0, f"the sandbox {what}; replaced")

    def _read_line(self, deadline: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        limit = 8 * self.limits["max_output_bytes"] + 65536
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            if len(self._buf) > limit:
                raise ValueError("reply too long")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError("the jail exited")
                self._buf += chunk


# ---------------------------------------------------------------- the jail side (runs in `python -c`)

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 16384, 1 << 18, 1 << 21
MNT_DETACH, PR_SET_PDEATHSIG = 2, 1
_KEEP_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def call(name: str, *args) -> None:
        if getattr(libc, name)(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")

    return call


def _boot(limits_json: str) -> None:
    """The jail's entry point: namespaces (when root), then pid 1 of the new pid namespace serves calls."""
    limits = json.loads(limits_json)
    protocol_in, protocol_out = os.dup(0), os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    libc = _libc()
    why = ""
    namespaces = False
    if os.environ.get(NO_NAMESPACES_ENV):
        why = f"{NO_NAMESPACES_ENV} is set"
    elif os.geteuid() != 0:
        why = "not root"
    else:
        try:
            libc("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
            namespaces = True
        except OSError as e:
            why = str(e)
    pid = os.fork() if namespaces else 0
    if pid:  # the bootstrap: the jail is its child (pid 1 inside); it outlives nothing
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    if namespaces:
        libc("prctl", PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() == 1:  # the bootstrap died before the line above
            os._exit(1)
    isolation = {"network": False, "filesystem": False, "why": why}
    if namespaces:
        try:
            _isolate_files(libc)
            isolation["filesystem"] = True
        except OSError as e:
            isolation["why"] = f"read-only mounts: {e}"
        isolation["network"] = True
    for name in PRELOADED:
        with contextlib.suppress(ImportError):
            __import__(name)
    _serve(protocol_in, protocol_out, limits, isolation, libc)


def _mount_points() -> list[tuple[str, str]]:
    """(mount point, its per-mount options) of every mount, from /proc/self/mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # \040 etc.
        out.append((point, fields[5]))
    return out


def _isolate_files(libc) -> None:
    """Every mount read-only (in this mount namespace only), and a /proc of this pid namespace."""
    libc("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    for point, options in _mount_points():
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in options.split(","):
            flags |= _KEEP_FLAGS.get(opt, 0)
        try:
            libc("mount", None, point.encode(), None, flags, None)
        except OSError as e:
            if e.errno != 2:  # ENOENT: a mount under one that was mounted over
                raise OSError(e.errno, f"{point}: {e.strerror}") from None
    _expose_interpreter(libc)
    # Read-only too: a /proc/sys file is writable by its owner's uid, capabilities or not.
    libc("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None)


def _expose_interpreter(libc) -> None:
    """Let `nobody` read the interpreter's own folders when a folder above them is closed to others (a Python
    under /root): that folder is covered by an empty read-only tmpfs, and only the interpreter's folders are
    bound back into it, read-only. Whatever else it held stays out of the child's sight."""
    import stat

    wanted = {
        os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix)
    }
    closed: dict[str, list[str]] = {}  # the highest closed folder → the interpreter folders under it
    for path in sorted(wanted):
        parts = Path(path).parts
        for i in range(2, len(parts)):
            folder = str(Path(*parts[:i]))
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                closed.setdefault(folder, []).append(path)
                break
    if not closed:
        return
    libc("mount", b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=700")  # staging
    for n, (folder, paths) in enumerate(sorted(closed.items())):
        staged = []
        for k, path in enumerate(paths):
            stage = f"/tmp/stage-{n}-{k}"
            os.mkdir(stage)
            libc("mount", path.encode(), stage.encode(), None, MS_BIND | MS_REC, None)
            staged.append((stage, path))
        libc("mount", b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755")
        for stage, path in staged:
            os.makedirs(path, mode=0o755, exist_ok=True)
            libc("mount", stage.encode(), path.encode(), None, MS_BIND | MS_REC, None)
            libc("mount", None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        libc("mount", None, folder.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)


def _serve(fd_in: int, fd_out: int, limits: dict, isolation: dict, libc) -> None:
    inp = os.fdopen(fd_in, "rb")
    out = os.fdopen(fd_out, "wb", buffering=0)

    def reply(msg: dict) -> None:
        try:
            out.write(json.dumps(msg, ensure_ascii=True).encode() + b"\n")
        except OSError:
            os._exit(0)

    reply({"ready": True, "isolation": isolation, "pid": os.getpid()})
    while True:
        line = inp.readline()
        if not line:
            os._exit(0)  # the worker closed the pipe, or died
        try:
            req = json.loads(line)
            msg = _one_call(str(req["code"]), limits, isolation, libc)
            msg["id"] = req["id"]
        except Exception as e:  # a bug here must still answer
            msg = {"id": None, "status": "error", "output": "", "elapsed_s": 0.0, "detail": repr(e)}
        reply(msg)


def _one_call(code: str, limits: dict, isolation: dict, libc) -> dict:
    import shutil
    import tempfile

    isolated = isolation["filesystem"]
    if isolated:  # a fresh tmpfs on /tmp: the scratch folder, gone when it is unmounted after the call
        libc("mount", b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=1777")
        scratch = "/tmp"
    else:
        scratch = tempfile.mkdtemp(prefix="duet-python-tool-")
    read_end, write_end = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _child(code, scratch, write_end, limits, drop_to_nobody=isolated)
        finally:
            os._exit(3)
    os.close(write_end)
    status, detail, output = _collect(pid, read_end, limits)
    elapsed = time.perf_counter() - t0
    os.close(read_end)
    _kill_leftovers(pid, isolated)
    if isolated:
        with contextlib.suppress(OSError):
            libc("umount2", b"/tmp", MNT_DETACH)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    text = output.decode("utf-8", "replace")
    return {"status": status, "output": text, "elapsed_s": elapsed, "detail": detail}


def _collect(pid: int, fd: int, limits: dict) -> tuple[str, str, bytes]:
    """Read the child's output until it exits (and its output ends), its time is up, or its output is too
    long; returns (status, detail, output)."""
    cap, timeout = limits["max_output_bytes"], limits["timeout_s"]
    deadline = time.monotonic() + timeout
    output = bytearray()
    exited: int | None = None
    while True:
        if exited is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exited = status
                deadline = min(deadline, time.monotonic() + 0.05)  # what is left in the pipe, briefly
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.05))
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk and exited is not None:
                break
            if not chunk:
                time.sleep(0.005)
                continue
            output += chunk
            if len(output) > cap:
                _kill(pid)
                return "output_limit", str(cap), bytes(output[:cap])
    if exited is None:
        _kill(pid)
        return "timeout", f"{timeout:g}", bytes(output)
    if os.WIFSIGNALED(exited):
        sig = os.WTERMSIG(exited)
        try:
            name = "SIGXCPU (CPU limit)" if sig == signal.SIGXCPU else signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return "signal", name, bytes(output)
    return ("ok" if os.WEXITSTATUS(exited) == 0 else "error"), "", bytes(output)


def _kill(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # its group (its descendants), and itself if it had no group yet
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _kill_leftovers(pid: int, own_pid_namespace: bool) -> None:
    """After a call: its process group, and with a pid namespace every process in it but the jail."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if own_pid_namespace and os.getpid() == 1:  # this /proc shows only the jail's own pid namespace
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)
    # Reap: every process killed above ends as the jail's child (orphans in a pid namespace go to its pid 1).
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.002)
        except ChildProcessError:
            break


def _child(code: str, scratch: str, out_fd: int, limits: dict, drop_to_nobody: bool) -> None:
    """The forked child: limits, scratch folder, no privileges, then the code."""
    import ast
    import resource
    import traceback

    os.setsid()
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    os.chdir(scratch)
    os.environ.clear()
    os.environ.update(HOME=scratch, TMPDIR=scratch, PATH="/usr/bin:/bin", LANG="C.UTF-8")
    mem = limits["memory_limit_mib"] << 20
    cpu = int(limits["timeout_s"]) + 2
    for what, value in (
        (resource.RLIMIT_AS, mem),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, 16 << 20),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(what, (value, value))
    if drop_to_nobody:
        resource.setrlimit(resource.RLIMIT_NPROC, (32, 32))
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)  # every capability goes with it: no remount, no network set-up
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="replace")  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="replace")  # noqa: SIM115
    sys.stdin = open(os.devnull)  # noqa: SIM115
    scope = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(code, "<call>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<call>", "exec"), scope)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<call>", "eval"), scope)
            if value is not None:
                print(repr(value))
        code_out = 0
    except BaseException as e:
        with contextlib.suppress(BaseException):
            sys.stderr.write("".join(traceback.format_exception_only(type(e), e)))
        code_out = 1
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code_out)

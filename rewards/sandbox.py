"""The killable verifier process: a hard per-item time limit and a memory cap that really hold.

Why a child process and not a thread: math-verify, latex2sympy and sympy can spend unbounded time
in C code (a big-integer power, a giant factorial) that no Python-level timer interrupts, and a
thread cannot be killed. So every item runs in a child process; the parent waits for the answer
until the deadline and, past it, SIGKILLs the child and carries on with a fresh one. The item scores
0 with reason `timeout`; the next item never sees the dead child's state or a late answer.

How the children are started, and why not `multiprocessing`: a fork server ("zygote") is started
once per sandbox as `python -c ...` with `subprocess` (fork+exec, safe from threaded parents such as
Ray workers) and a minimal environment. It imports math-verify and runs a warm-up verification (the
expensive part, seconds on a loaded machine), then forks one verifier child per request: a fork of
the warm, single-threaded zygote is ready in milliseconds, so a chain of hostile items, each killed
at its time limit, never waits for a cold start. Each child talks JSON lines over its own Unix
socket, whose parent end the zygote hands over (SCM_RIGHTS); the zygote reaps the children and
reports how they exited. multiprocessing's spawn and forkserver contexts re-import the parent's
`__main__` (Ray's worker script, a pytest runner, the user's driver) and unpickle what arrives; here
only plain JSON (strings, floats) ever crosses, and nothing is unpickled.

Limits inside the child:
- RLIMIT_AS = memory_limit_mib (set in the zygote, so inherited): a hostile item gets MemoryError
  (scored `error: out of memory`), not the machine's memory.
- RLIMIT_CPU, re-armed before each item to (CPU used so far + timeout + 1 s): a backstop that makes
  the kernel kill a child whose parent died while it was stuck in C code (an orphan would otherwise
  spin forever). An orphan that is not stuck exits on EOF of its socket, the zygote on EOF of its own.

A spare child (on by default) is forked ahead, so a timeout costs the next item nothing: the spare is
promoted and a new one forked while work continues.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.records import VerifyItem, VerifyResult
from rewards.verifiers import LOCAL_VERIFIERS, VerifierSettings, safe_echo

if TYPE_CHECKING:
    from cluster.config import RewardsConfig

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
_ZYGOTE_BOOT = "import sys; from rewards.sandbox import _zygote_main; _zygote_main(int(sys.argv[1]))"
_MAX_REPLY_BYTES = 8 << 20  # a reply longer than this without a newline is a broken child
_SIGXCPU = 24


class SandboxError(RuntimeError):
    """The verifier child cannot be started (bad memory limit, broken install, custom import...)."""


class _ChildDied(Exception):
    pass


class _Child:
    """One forked verifier process and the non-blocking socket to it (used by Sandbox only)."""

    def __init__(self, pid: int, sock: socket.socket, zygote: _Zygote) -> None:
        self.pid = pid
        self._sock = sock
        self._zygote = zygote
        self._fd = sock.fileno()
        sock.setblocking(False)
        self._buf = bytearray()
        self.ready: dict | None = None

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while view:
            try:
                n = os.write(self._fd, view[: 1 << 16])
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            except OSError as e:  # EPIPE, ECONNRESET: the child is gone
                raise _ChildDied(str(e)) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            poller.poll(max(1, int(remaining * 1000)))

    def read_line(self, deadline: float) -> bytes:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            if len(self._buf) > _MAX_REPLY_BYTES:
                raise _ChildDied("reply too long")
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError from None
                poller.poll(max(1, int(remaining * 1000)))
                continue
            except OSError as e:
                raise _ChildDied(str(e)) from None
            if not chunk:
                raise _ChildDied("EOF")
            self._buf += chunk

    def wait_ready(self, timeout_s: float) -> dict:
        if self.ready is None:
            line = self.read_line(time.monotonic() + timeout_s)
            msg = json.loads(line)
            if not isinstance(msg, dict) or not msg.get("ready"):
                raise _ChildDied(str(msg.get("error", "bad ready message")) if isinstance(msg, dict) else "?")
            self.ready = msg
        return self.ready

    def exit_code(self, timeout_s: float = 1.0) -> int | None:
        """How the child ended (negative: the signal), reaped by the zygote; None if still running."""
        return self._zygote.exit_status(self.pid, timeout_s)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._sock.close()
        self._zygote.exit_status(self.pid, 5.0)  # reaped: no zombie left behind

    def close(self) -> None:
        """Polite stop: EOF on its socket makes an idle child exit; a busy one is killed."""
        self._sock.close()
        if self._zygote.exit_status(self.pid, 1.0) is None:
            self.kill()


class _Zygote:
    """The fork server: warms up once, then forks ready verifier children on request.

    Requests and replies are single packets on a SOCK_SEQPACKET socket pair, one at a time (the
    Sandbox's lock serialises them): `fork` answers the child's pid with its socket end attached,
    `wait` answers how a child exited (reaping it), or null while it runs.
    """

    def __init__(self, boot_line: bytes, env: dict[str, str]) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE_BOOT, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                env=env,
                close_fds=True,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._sock = mine
        self.ready: dict | None = None
        self._request({"op": "boot", "boot": json.loads(boot_line)}, 10.0, expect_reply=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float) -> dict:
        if self.ready is None:
            msg, _ = self._receive(timeout_s)
            if not msg.get("ready"):
                raise _ChildDied(str(msg.get("error", "bad ready message")))
            self.ready = msg
        return self.ready

    def fork(self, timeout_s: float = 10.0) -> _Child:
        msg, fds = self._request({"op": "fork"}, timeout_s)
        if not fds:
            raise _ChildDied(f"fork failed: {msg.get('error', 'no socket')}")
        for extra in fds[1:]:
            os.close(extra)
        sock = socket.socket(fileno=fds[0])
        if not isinstance(msg.get("pid"), int):
            sock.close()
            raise _ChildDied("fork reply without a pid")
        return _Child(msg["pid"], sock, self)

    def exit_status(self, pid: int, timeout_s: float) -> int | None:
        try:
            msg, _ = self._request({"op": "wait", "pid": pid, "timeout_s": timeout_s}, timeout_s + 5.0)
        except (_ChildDied, TimeoutError):
            return None
        status = msg.get("status")
        return status if isinstance(status, int) else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """EOF on its socket makes the zygote exit (its idle children exit on their own EOF)."""
        self._sock.close()
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5.0)

    def _request(self, msg: dict, timeout_s: float, *, expect_reply: bool = True) -> tuple[dict, list[int]]:
        self._sock.settimeout(timeout_s)
        try:
            self._sock.sendall(json.dumps(msg).encode())
        except OSError as e:  # socket.timeout is an OSError too
            raise _ChildDied(f"zygote: {e}") from None
        return self._receive(timeout_s) if expect_reply else ({}, [])

    def _receive(self, timeout_s: float) -> tuple[dict, list[int]]:
        self._sock.settimeout(timeout_s)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._sock, 1 << 16, 4)
        except TimeoutError:
            raise
        except OSError as e:
            raise _ChildDied(f"zygote: {e}") from None
        if not data:
            raise _ChildDied("zygote: EOF")
        try:
            msg = json.loads(data)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            for fd in fds:
                os.close(fd)
            raise _ChildDied("zygote: bad reply")
        return msg, fds


class Sandbox:
    """Runs verifier items one at a time in a killable child process with time and memory limits.

    `run(item)` never raises and never takes longer than `timeout_s` (plus a few ms) once a child is
    ready; it returns `too_long` for oversized completions without starting any parsing. Not
    thread-safe by design (one sandbox per worker); a lock makes accidental sharing serialise.
    """

    def __init__(self, cfg: RewardsConfig, *, spare: bool = True, start_timeout_s: float = 60.0) -> None:
        self.timeout_s = float(cfg.timeout_s)
        self.max_completion_chars = int(cfg.max_completion_chars)
        self.memory_limit_mib = int(cfg.memory_limit_mib)
        self.settings = VerifierSettings.from_config(cfg)
        self.spare = spare
        self.start_timeout_s = start_timeout_s
        boot = {
            "memory_limit_mib": self.memory_limit_mib,
            "timeout_s": self.timeout_s,
            "settings": self.settings.to_dict(),
        }
        self._boot_line = json.dumps(boot).encode() + b"\n"
        self._env = child_environment(cfg.sandbox_env)
        self._zygote: _Zygote | None = None
        self._child: _Child | None = None
        self._spare: _Child | None = None
        self._next_id = 0
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {"items": 0, "timeouts": 0, "crashes": 0, "restarts": 0}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Sandbox:
        """Start (and warm) the child now, so that a broken setup fails here and not on item one."""
        with self._lock:
            self._ensure_child()
        return self

    @property
    def child_pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def close(self) -> None:
        with self._lock:
            for c in (self._child, self._spare):
                if c is not None:
                    c.close()
            self._child = self._spare = None
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_zygote(self) -> _Zygote:
        """The warm fork server, started (or restarted, if it died) here; SandboxError if it cannot."""
        if self._zygote is not None and self._zygote.alive():
            return self._zygote
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        try:
            zygote = _Zygote(self._boot_line, self._env)
        except (OSError, _ChildDied, TimeoutError) as e:
            raise SandboxError(f"cannot start the verifier process: {e}") from e
        try:
            zygote.wait_ready(self.start_timeout_s)
        except (TimeoutError, _ChildDied, ValueError) as e:
            zygote.close()
            code = zygote.proc.returncode
            raise SandboxError(
                f"the verifier process did not start: {type(e).__name__}: {e} (exit code {code}); is "
                f"memory_limit_mib ({self.memory_limit_mib}) too low, or the installation broken?"
            ) from None
        self._zygote = zygote
        return zygote

    def _spawn(self) -> _Child:
        zygote = self._ensure_zygote()
        try:
            return zygote.fork()
        except (OSError, _ChildDied, TimeoutError) as e:
            zygote.close()  # out of step or dead: the next spawn starts a fresh one
            self._zygote = None
            raise SandboxError(f"cannot fork a verifier child: {e}") from e

    def _ensure_child(self) -> _Child:
        """A ready child: the current one, else the promoted spare, else a new one (two attempts)."""
        if self._child is not None:
            return self._child
        last_error = ""
        for _ in range(2):
            try:
                child = self._spare if self._spare is not None else self._spawn()
            except SandboxError as e:
                last_error = str(e)
                continue
            self._spare = None
            try:
                child.wait_ready(self.start_timeout_s)
            except (TimeoutError, _ChildDied, ValueError) as e:
                code = child.exit_code() if not isinstance(e, TimeoutError) else None
                child.kill()
                last_error = f"{type(e).__name__}: {e} (exit code {code})"
                continue
            self._child = child
            if self.spare:
                try:
                    self._spare = self._spawn()
                except SandboxError:  # no spare this time (fork failed): the next kill spawns anew
                    self._spare = None
            return child
        raise SandboxError(
            f"the verifier child did not start: {last_error}; is memory_limit_mib "
            f"({self.memory_limit_mib}) too low, or the installation broken?"
        )

    def _drop_child(self) -> None:
        """Kill the current child; the spare (already forked) takes over on the next item."""
        if self._child is not None:
            self._child.kill()
            self._child = None
            self.stats["restarts"] += 1

    # ------------------------------------------------------------ scoring

    def run_many(self, items: list[VerifyItem]) -> list[VerifyResult]:
        """Score items sequentially (one child, one at a time); same order, one result each."""
        return [self.run(it) for it in items]

    def run(self, item: VerifyItem) -> VerifyResult:
        """Score one item within the time limit. Never raises."""
        t0 = time.perf_counter()
        with self._lock:
            self.stats["items"] += 1
            try:
                return self._run_locked(item, t0)
            except Exception as e:  # a bug here must still give the item exactly one result
                self._drop_child()
                return VerifyResult(0.0, f"error: sandbox: {type(e).__name__}: {safe_echo(str(e))}", _el(t0))

    def _run_locked(self, item: VerifyItem, t0: float) -> VerifyResult:
        completion = _as_text(item.completion)
        reference = _as_text(item.reference)
        prompt = _as_text(item.prompt)
        if completion is None or reference is None or prompt is None:
            return VerifyResult(0.0, "error: completion, reference and prompt must be strings", _el(t0))
        if item.verifier not in LOCAL_VERIFIERS:
            name = safe_echo(str(item.verifier), 40)
            return VerifyResult(0.0, f"error: unknown verifier {name!r} for the local sandbox", _el(t0))
        if len(completion) > self.max_completion_chars:
            return VerifyResult(0.0, "too_long", _el(t0), {"chars": len(completion)})
        if len(reference) > self.max_completion_chars:
            return VerifyResult(0.0, "error: reference too long", _el(t0))
        try:
            child = self._ensure_child()
        except SandboxError as e:
            return VerifyResult(0.0, f"error: sandbox unavailable: {safe_echo(str(e))}", _el(t0))

        self._next_id += 1
        req_id = self._next_id
        req = {
            "id": req_id,
            "verifier": item.verifier,
            "completion": completion,
            "reference": reference,
            "prompt": prompt if item.verifier == "custom" else "",
        }
        # ensure_ascii: lone surrogates and control characters travel as \u escapes, never raw bytes.
        payload = json.dumps(req, ensure_ascii=True).encode("ascii") + b"\n"
        start = time.perf_counter()  # the time limit counts from handing the item over
        deadline = time.monotonic() + self.timeout_s
        try:
            child.send(payload, deadline)
            line = child.read_line(deadline)
        except TimeoutError:
            elapsed = _el(start)  # taken before the kill and reap, which are not the item's time
            self._drop_child()
            self.stats["timeouts"] += 1
            return VerifyResult(0.0, "timeout", elapsed)
        except _ChildDied:
            elapsed = _el(start)
            code = child.exit_code()
            self._drop_child()
            if code == -_SIGXCPU:  # the CPU backstop fired: the item was running away
                self.stats["timeouts"] += 1
                return VerifyResult(0.0, "timeout", elapsed)
            self.stats["crashes"] += 1
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            return VerifyResult(0.0, f"error: verifier crashed ({how})", elapsed)
        elapsed = _el(start)
        try:
            reply = json.loads(line)
            if not isinstance(reply, dict) or reply.get("id") != req_id:
                raise ValueError("reply id mismatch")
            reward = float(reply["reward"])
            reason = str(reply["reason"])
            details = reply.get("details") or {}
            if not math.isfinite(reward) or not isinstance(details, dict):
                raise ValueError("bad reward or details")
        except (ValueError, KeyError, TypeError) as e:
            self._drop_child()  # out of step with its parent: never trust it with another item
            return VerifyResult(0.0, f"error: bad reply from verifier: {safe_echo(str(e))}", elapsed)
        return VerifyResult(reward, reason, elapsed, details)


# What a verifier child may see of its parent's environment. Everything else (RAY_AUTH_TOKEN, reward
# and control tokens, cloud credentials) is withheld: the child parses untrusted text and runs user code.
_CHILD_ENV_KEEP = (
    "PATH", "HOME", "USER", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ", "TMPDIR",
    "PYTHONPATH", "PYTHONHOME", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONDONTWRITEBYTECODE",
    "PYTHONNOUSERSITE", "VIRTUAL_ENV", "OMP_NUM_THREADS", "LD_LIBRARY_PATH",
)  # fmt: skip


def child_environment(extra: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The minimal environment of a verifier child: a few harmless variables, plus `extra` names
    (rewards.sandbox_env) the user chose to pass on; the repository is put on PYTHONPATH."""
    env = {name: os.environ[name] for name in (*_CHILD_ENV_KEEP, *extra) if name in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    # Verification is single-threaded; keep numeric libraries from starting thread pools.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _el(t0: float) -> float:
    return time.perf_counter() - t0


def _as_text(value: Any) -> str | None:
    """Strings pass; bytes (invalid UTF-8 from some engine) decode with replacement; others fail."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return None


# ---------------------------------------------------------------- the child side


def _zygote_main(fd: int) -> None:
    """Entry point of the fork server: limits, imports and warm-up once, then fork on request."""
    import resource

    os.dup2(2, 1)  # stray print()s of libraries or custom functions go to stderr
    control = socket.socket(fileno=fd)

    def reply(msg: dict, fds: list[int] | None = None) -> None:
        try:
            socket.send_fds(control, [json.dumps(msg, default=str).encode()], fds or [])
        except OSError:  # the parent is gone: nobody to answer
            os._exit(0)

    boot = json.loads(control.recv(1 << 20) or b"{}").get("boot", {})
    timeout_s = float(boot.get("timeout_s", 5.0))
    mem = int(boot.get("memory_limit_mib", 1024)) << 20
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mem if hard == resource.RLIM_INFINITY else min(mem, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # hard too: user code cannot lift it; inherited

    try:
        from rewards import verifiers as V

        settings = V.VerifierSettings(**boot.get("settings", {}))
        custom_fn = None
        custom_error = None
        if settings.custom_function:
            try:
                custom_fn = V.load_custom(settings.custom_function)
            except Exception as e:
                custom_error = f"error: custom function {settings.custom_function!r}: {type(e).__name__}: {e}"
        # Warm-up: import sympy's lazily loaded parts once, here, so that no child pays for them.
        # (A cold process takes ~200 ms on its first polynomial, ~10x a warm one.)
        for answer, ref in (
            ("\\frac{1}{2}", "0.5"),
            ("[1,2)", "[1,2)"),
            ("\\{1,2\\}", "\\{2,1\\}"),
            ("(x+1)^2", "x^2+2x+1"),
            ("\\sqrt{8}", "2\\sqrt{2}"),
            ("0.3", "30\\%"),
            ("x=2", "2"),
        ):
            V.verify_math(f"so \\boxed{{{answer}}}", ref)
    except BaseException as e:
        reply({"ready": False, "error": f"{type(e).__name__}: {_safe_str(str(e))}"})
        raise SystemExit(1) from None
    reply({"ready": True, "pid": os.getpid()})

    exited: dict[int, int] = {}  # reaped children's statuses (negative: the signal), until asked for

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exited[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    while True:
        try:
            raw = control.recv(1 << 16)
        except OSError:
            raw = b""
        if not raw:
            os._exit(0)  # the parent closed the socket (or died); idle children exit on their own EOF
        request = json.loads(raw)
        if request.get("op") == "fork":
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                pid = os.fork()
            except OSError as e:
                parent_end.close()
                child_end.close()
                reply({"error": f"{type(e).__name__}: {e}"})
                continue
            if pid == 0:  # the child: never return into this loop
                code = 0
                try:
                    control.close()
                    parent_end.close()
                    _serve_items(child_end, timeout_s, settings, custom_fn, custom_error)
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            child_end.close()
            reply({"pid": pid}, [parent_end.fileno()])
            parent_end.close()
        elif request.get("op") == "wait":
            pid = int(request.get("pid", -1))
            deadline = time.monotonic() + float(request.get("timeout_s", 1.0))
            reap()
            while pid not in exited and time.monotonic() < deadline:
                time.sleep(0.005)
                reap()
            reply({"status": exited.pop(pid, None)})
        reap()


def _serve_items(
    sock: socket.socket, timeout_s: float, settings: Any, custom_fn: Any, custom_error: Any
) -> None:
    """The forked child: answer ready, then one JSON line per item until EOF."""
    import resource

    from rewards import verifiers as V

    inp = sock.makefile("rb")
    out = sock.makefile("wb", buffering=0)

    def reply(msg: dict) -> None:
        try:
            data = json.dumps(msg, ensure_ascii=True, default=str).encode("ascii")
        except (TypeError, ValueError, RecursionError):
            msg = {k: msg[k] for k in ("id", "reward", "reason") if k in msg}
            data = json.dumps(msg, ensure_ascii=True, default=str).encode("ascii")
        try:
            out.write(data + b"\n")
        except OSError:  # the parent is gone (closed, killed): nobody to answer, exit quietly
            os._exit(0)

    reply({"ready": True, "pid": os.getpid()})
    while True:
        line = inp.readline()
        if not line:
            return  # parent closed the socket (or died): nothing more to do
        used = resource.getrusage(resource.RUSAGE_SELF)
        budget = math.ceil(used.ru_utime + used.ru_stime + timeout_s + 1.0)
        _s, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
        if cpu_hard == resource.RLIM_INFINITY or budget < cpu_hard:
            resource.setrlimit(resource.RLIMIT_CPU, (budget, cpu_hard))
        req_id = -1
        try:
            req = json.loads(line)
            req_id = req["id"]
            if req["verifier"] == "custom" and custom_error is not None:
                verdict = V.Verdict(0.0, custom_error, {})
            else:
                verdict = V.score_one(
                    req["verifier"], req["prompt"], req["completion"], req["reference"], settings, custom_fn
                )
            reply(
                {"id": req_id, "reward": verdict.reward, "reason": verdict.reason, "details": verdict.details}
            )
        except MemoryError:
            reply({"id": req_id, "reward": 0.0, "reason": "error: out of memory", "details": {}})
        except RecursionError:
            reply(
                {"id": req_id, "reward": 0.0, "reason": "error: expression nested too deeply", "details": {}}
            )
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:
            reason = f"error: {type(e).__name__}: {_safe_str(str(e))}"
            reply({"id": req_id, "reward": 0.0, "reason": reason, "details": {}})


def _safe_str(text: str) -> str:
    """safe_echo without importing anything new (the child may be out of memory when it calls this)."""
    try:
        return safe_echo(text)
    except Exception:
        return "?"

"""The control/status API of a running training driver: the driver-side state (RunControl), its HTTP
server (FastAPI, served from a thread of the driver) and its command-line clients, `duet status` and
`duet scale`.

    GET  /status       anyone who can reach the port: step, versions, engines, queue, last metrics,
                       "state": "paused" once a pause has taken effect, and "waiting" while a step waits
                       for its data (asynchronous mode: {"step", "for", "since"})
    POST /scale        {"engines": N}                       Authorization: Bearer <token>
    POST /pause        (no body, or {})                     Authorization: Bearer <token>
    POST /resume       (no body, {}, or {"steps": N})       Authorization: Bearer <token>
                       with "steps": pause again once N more steps are done (a step at a time)
    POST /checkpoint   (no body, or {})                     Authorization: Bearer <token>

The HTTP layer only checks, parses and forwards to a Controller. The driver's Controller is RunControl:
its methods are called from the server's threads while the training loop runs, so they are thread-safe
and return at once. Scale and checkpoint are queued ({"accepted": true, "request_id": ...}) and the loop
applies them between steps (`RunControl.apply`), when nothing is in flight, or, in asynchronous mode, while
a step waits for its data (the driver's `rollout_async`; the checkpoint is then of the last step trained).
A ValueError from the controller becomes 400 with its message.

The driver writes RUN_DIR/control.json (url and token, mode 0600) so that `duet status --run-dir` and
`duet scale --run-dir` find the server without the token on a command line. Without a token the
state-changing calls are open to whoever can reach the port, so a token-less server binds loopback only.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and
# `Request` is imported inside make_app (clients should not pay for importing FastAPI).
import argparse
import hmac
import ipaddress
import json
import os
import queue
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

MAX_BODY_BYTES = 4096  # the largest request is {"engines": N}
TOKEN_ENV = "DUET_CONTROL_TOKEN"
URL_ENV = "DUET_CONTROL_URL"


class Controller(Protocol):
    def status(self) -> dict: ...
    def scale(self, engines: int) -> dict: ...
    def pause(self) -> dict: ...
    def resume(self, steps: int | None = None) -> dict: ...
    def checkpoint(self) -> dict: ...


# ---- the driver's side ----
class RunControl:
    """The Controller of a training run: answers the server's threads, queues what changes the run.

    The loop calls `publish` after every step (what /status shows) and `apply` before every step.
    """

    # Most engines a scale request may ask for until the driver sets the cluster's own bound
    # (rollout.max_engines, or what the cluster's resources hold): a typo must not wait forever.
    DEFAULT_MAX_ENGINES = 64

    def __init__(self, run_dir: str | Path, max_engines: int | None = None, paused: bool = False) -> None:
        self.run_dir = str(run_dir)
        self.max_engines = max_engines
        self._requests: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._status: dict = {"state": "starting"}
        self.paused = paused  # asked for: the loop stops at its next point between steps
        self._held = False  # the loop has stopped there (status "state": "paused")
        self._steps_to_pause: int | None = None  # resume(steps=N): steps left before pausing again
        self._waiting: dict | None = None  # what the step in progress waits for (until it is published)

    def status(self) -> dict:
        with self._lock:
            status = dict(self._status, paused=self.paused)
            if self._held:
                status["state"] = "paused"
            if self._steps_to_pause is not None:
                status["steps_before_pause"] = self._steps_to_pause
            if self._waiting is not None:
                status["waiting"] = dict(self._waiting)
            return status

    def scale(self, engines: int) -> dict:
        if engines < 1:
            raise ValueError("engines must be >= 1")
        limit = self.max_engines if self.max_engines is not None else self.DEFAULT_MAX_ENGINES
        if engines > limit:
            raise ValueError(
                f"engines={engines} is more than this run may use ({limit}: rollout.max_engines, by default "
                "what the cluster's resources hold); ask for fewer, or add nodes and restart with a higher "
                "rollout.max_engines"
            )
        return self._queue("scale", engines=engines)

    def pause(self) -> dict:
        with self._lock:
            self.paused, self._steps_to_pause = True, None
        return {"accepted": True, "paused": True}

    def resume(self, steps: int | None = None) -> dict:
        """Let the loop go on; with `steps`, it pauses again once that many more steps are done (the
        step in flight, if any, counts): an operator looks at a run one step at a time, and a test puts
        a fault between two given steps whatever the machine's speed."""
        if steps is not None and steps < 1:
            raise ValueError("steps must be >= 1")
        with self._lock:
            self.paused, self._steps_to_pause = False, steps
        return {"accepted": True, "paused": False, **({"steps_before_pause": steps} if steps else {})}

    def checkpoint(self) -> dict:
        return self._queue("checkpoint")

    def waiting(self, step: int, what: str) -> None:
        """Step `step` waits for `what` (its data): /status shows it, with since when, until the step is
        published. Requests sent from then on are applied while it waits."""
        with self._lock:
            since = self._waiting["since"] if self._waiting and self._waiting["step"] == step else time.time()
            self._waiting = {"step": step, "for": what, "since": since}

    def publish(
        self, step: int, steps: int, version: int, engine_versions: dict[int, int | None], metrics: dict
    ) -> None:
        """What /status shows from now on: the step just done and its scalar metrics."""
        status = {
            "state": "running",
            "step": step,
            "steps": steps,
            "policy_version": version,
            "engines": [{"id": i, "version": v} for i, v in engine_versions.items()],
            "queue_depth": metrics.get("queue", {}).get("depth", 0),
            "last_metrics": {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))},
            "run_dir": self.run_dir,
        }
        with self._lock:
            self._status = status
            self._waiting = None
            if self._steps_to_pause is not None:
                self._steps_to_pause -= 1
                if self._steps_to_pause == 0:
                    self.paused, self._steps_to_pause = True, None

    def apply(self, scale: Callable[[int], Any], checkpoint: Callable[[], Path]) -> list[dict]:
        """Apply the queued requests: `scale(engines)` resizes the fleet, `checkpoint()` saves one and
        returns its path. While paused, wait here (between steps: nothing in flight), and /status says
        "state": "paused" (the pause has taken effect). Returns the events to record in metrics.jsonl."""
        applied = []
        try:
            while True:
                try:
                    kind, request_id, kw = self._requests.get(timeout=0.2 if self.paused else 0)
                except queue.Empty:
                    if self.paused:
                        with self._lock:
                            self._held = True
                        continue
                    return applied
                if kind == "scale":
                    scale(kw["engines"])  # recorded in the fleet's events
                elif kind == "checkpoint":
                    path = str(checkpoint())
                    applied.append({"request_id": request_id, "event": "checkpoint", "path": path})
        finally:
            with self._lock:
                self._held = False

    def _queue(self, kind: str, **kw: Any) -> dict:
        request_id = f"{kind}-{time.monotonic_ns()}"
        self._requests.put((kind, request_id, kw))
        return {"accepted": True, "request_id": request_id, "applied": "before the next step"}


# ---- the server ----
def make_app(controller: Controller, token: str | None):
    """The FastAPI app. `token=None` leaves the state-changing calls open (see ControlServer)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="duet-rl control", docs_url=None, redoc_url=None, openapi_url=None)

    def check_token(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def json_body(request: Request) -> dict:
        """The request's JSON object, read no further than MAX_BODY_BYTES (chunked bodies too)."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
        if not body.strip():
            return {}
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(415, "send application/json")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's limit
            raise HTTPException(400, "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "body must be a JSON object")
        return data

    async def call(method, *args) -> JSONResponse:
        try:
            result = await run_in_threadpool(method, *args)
        except ValueError as e:  # the controller refuses the request (e.g. an impossible engine count)
            raise HTTPException(400, str(e)) from None
        return JSONResponse(jsonable_encoder(result if isinstance(result, dict) else {"result": result}))

    @app.get("/status")
    async def status() -> JSONResponse:
        return await call(controller.status)

    # The bodies are read and checked by hand (size cap, exact shape); this describes them for clients
    # and for the schema-driven fuzz tests. No schema is served (openapi_url=None).
    scale_body = {
        "type": "object",
        "required": ["engines"],
        "properties": {"engines": {"type": "integer", "minimum": 1}},
    }

    @app.post(
        "/scale", openapi_extra={"requestBody": {"content": {"application/json": {"schema": scale_body}}}}
    )
    async def scale(request: Request) -> JSONResponse:
        check_token(request)
        body = await json_body(request)
        engines = body.get("engines")
        if set(body) != {"engines"} or type(engines) is not int or engines < 1:  # bool is no count
            raise HTTPException(422, 'body must be {"engines": N} with an integer N >= 1')
        return await call(controller.scale, engines)

    resume_body = {"type": "object", "properties": {"steps": {"type": "integer", "minimum": 1}}}

    @app.post(
        "/resume", openapi_extra={"requestBody": {"content": {"application/json": {"schema": resume_body}}}}
    )
    async def resume(request: Request) -> JSONResponse:
        check_token(request)
        body = await json_body(request)
        if not body:
            return await call(controller.resume)
        steps = body.get("steps")
        if set(body) != {"steps"} or type(steps) is not int or steps < 1:
            raise HTTPException(422, 'body must be empty or {"steps": N} with an integer N >= 1')
        return await call(controller.resume, steps)

    def action(name: str):
        async def endpoint(request: Request) -> JSONResponse:
            check_token(request)
            if await json_body(request):
                raise HTTPException(422, f"/{name} takes no parameters")
            return await call(getattr(controller, name))

        return endpoint

    for name in ("pause", "checkpoint"):
        app.post(f"/{name}")(action(name))
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


class ControlServer:
    """uvicorn in a daemon thread of the driver process. `start()` returns the URL (with the real port
    when port is 0); `stop()` shuts it down. A non-loopback host without a token is refused."""

    def __init__(
        self, controller: Controller, host: str = "127.0.0.1", port: int = 0, token: str | None = None
    ):
        if token is None and not is_loopback(host):
            raise ValueError(f"control API on {host!r}: a non-loopback address needs a token")
        self.host, self.port, self.token = host, port, token
        self.app = make_app(controller, token)
        self.url: str | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self, timeout_s: float = 15.0) -> str:
        import uvicorn

        # Bind here, not in uvicorn: the real port of port 0 is known at once and a bind error is raised
        # in the caller's thread.
        family, kind, proto, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        self._sock = socket.socket(family, kind, proto)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(addr)
        port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="duet-control", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"control API did not start on {self.host}:{port}")
            time.sleep(0.02)
        # A wildcard bind is reachable on loopback; other machines use the host's own name.
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        self.url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None


def write_control_file(run_dir: str | Path, url: str, token: str | None) -> Path:
    """RUN_DIR/control.json, readable by its owner only (it holds the token); replaced atomically."""
    path = Path(run_dir) / "control.json"
    tmp = path.with_name(".control.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # the mode of a leftover tmp file is not O_CREAT's
        json.dump({"url": url, "token": token, "pid": os.getpid()}, f)
    os.replace(tmp, path)
    return path


def start_control(controller: Controller, control_cfg, run_dir: str | Path) -> ControlServer | None:
    """What the driver calls after start-up: serve the API per `cfg.control` and write control.json.

    The token is control.token, else DUET_CONTROL_TOKEN, else a fresh random one. Returns None when
    control.enabled is false. Call `.stop()` on the result at shutdown.
    """
    if not control_cfg.enabled:
        return None
    token = control_cfg.token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32)
    server = ControlServer(controller, control_cfg.host, control_cfg.port, token)
    write_control_file(run_dir, server.start(), token)
    return server


# ---- the clients ----
def _add_target_args(ap: argparse.ArgumentParser) -> None:
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--run-dir", help="run folder: its control.json gives the URL and token")
    where.add_argument(
        "--url", help=f"control API URL (default: {URL_ENV}, else the newest runs/*/control.json)"
    )
    ap.add_argument("--token", help=f"bearer token (default: control.json, else {TOKEN_ENV})")


def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    info: dict[str, Any] = {}
    url = args.url or (None if args.run_dir else os.environ.get(URL_ENV))
    control_file = Path(args.run_dir) / "control.json" if args.run_dir else None
    if url is None and control_file is None:
        found = sorted(Path("runs").glob("*/control.json"), key=lambda p: p.stat().st_mtime)
        control_file = found[-1] if found else None
    if url is None:
        if control_file is None:
            raise SystemExit(f"duet: no control API found: give --run-dir or --url (or set {URL_ENV})")
        if not control_file.is_file():
            raise SystemExit(f"duet: {control_file} not found: is the run serving its control API?")
        info = json.loads(control_file.read_text())
        url = info["url"]
    return url.rstrip("/"), args.token or info.get("token") or os.environ.get(TOKEN_ENV)


def _request(method: str, url: str, token: str | None = None, body: dict | None = None) -> int:
    """Send, print the JSON answer (pretty); 0 on 2xx."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(method, url, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        print(f"duet: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(r.json(), indent=2))
    except ValueError:
        print(r.text)
    if r.status_code == 401:
        print(f"duet: unauthorized: give --token, --run-dir (control.json) or {TOKEN_ENV}", file=sys.stderr)
    return 0 if r.is_success else 1


def status_main(argv: list[str]) -> int:
    """`duet status --job ID` is a Ray job's status (cluster.jobs); otherwise the training run's."""
    if any(a == "--job" or a.startswith("--job=") for a in argv):
        from cluster.jobs import job_status_main

        return job_status_main(argv)
    ap = argparse.ArgumentParser(
        prog="duet status",
        description="Status of a running training run (or of a Ray job with --job JOB_ID --address URL).",
    )
    _add_target_args(ap)
    args = ap.parse_args(argv)
    url, token = _target(args)
    return _request("GET", f"{url}/status", token)


def scale_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="duet scale", description="Change the number of rollout engines.")
    ap.add_argument("--engines", type=int, required=True, help="engines wanted (>= 1)")
    _add_target_args(ap)
    args = ap.parse_args(argv)
    if args.engines < 1:
        ap.error("--engines must be >= 1")
    url, token = _target(args)
    return _request("POST", f"{url}/scale", token, {"engines": args.engines})

"""The HTTP reward server: the same verifiers, behind FastAPI, for trainers on other machines.

    duet serve-reward [--host 127.0.0.1] [--port 8765] [--token T] [--workers M]
    python -m rewards.server ...            (the same thing)

`POST /v1/verify` takes `{"items": [{"completion": str, "reference": str, "verifier": "math",
"prompt": str}, ...]}` (verifier and prompt optional) and answers `{"results": [{"reward": float,
"reason": str, "elapsed_s": float}, ...]}` in the same order. `GET /healthz` is 200 while every
verifier thread is alive (503 otherwise).

Safety, because the input is untrusted and arrives from the network:
- binds to 127.0.0.1 by default and refuses to start on any other address without a bearer token
  (`--token` or the DUET_REWARD_TOKEN environment variable, which keeps it out of `ps`); with a
  token set, POST needs `Authorization: Bearer <token>` (401 otherwise, compared in constant time);
- the body is capped while it streams in (413), so is the item count (413), and only JSON is
  accepted (415); the body is parsed with the standard json module, never unpickled;
- the verifiers run in the same killable Sandbox children as the Ray workers (M sandboxes, one
  thread each, fed from one queue), so time and memory limits are identical; no Ray is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import queue
import sys
import threading
from concurrent.futures import Future
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from cluster.config import ConfigError, RewardsConfig, load_config
from cluster.records import VerifyItem, VerifyResult
from rewards.sandbox import Sandbox
from rewards.verifiers import LOCAL_VERIFIERS, safe_echo

DEFAULT_PORT = 8765
DEFAULT_MAX_ITEMS = 1024
DEFAULT_MAX_BODY_BYTES = 16 << 20
TOKEN_ENV = "DUET_REWARD_TOKEN"


class LocalVerifierPool:
    """M sandboxes, each owned by one thread that takes items from a shared queue.

    Threads, not processes, on this side: each thread only waits on its sandbox child, which does
    the work (and is the thing that gets killed). Requests interleave at item granularity.
    """

    def __init__(self, cfg: RewardsConfig, workers: int) -> None:
        self._queue: queue.Queue[tuple[VerifyItem, Future] | None] = queue.Queue()
        self._sandboxes = [Sandbox(cfg).start() for _ in range(max(1, workers))]
        self._threads = [
            threading.Thread(target=self._serve, args=(sb,), name=f"reward-verifier-{i}", daemon=True)
            for i, sb in enumerate(self._sandboxes)
        ]
        self._closed = False
        self.served = 0  # items scored since start (read by /healthz; only the serving threads write it)
        self._served_lock = threading.Lock()
        for t in self._threads:
            t.start()

    def _serve(self, sandbox: Sandbox) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            item, fut = job
            if fut.set_running_or_notify_cancel():
                fut.set_result(sandbox.run(item))  # run() never raises
                with self._served_lock:
                    self.served += 1

    def submit(self, item: VerifyItem) -> Future:
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def alive(self) -> bool:
        return not self._closed and all(t.is_alive() for t in self._threads)

    def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10.0)
        for sb in self._sandboxes:
            sb.close()


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; any other name or address counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(
    cfg: RewardsConfig,
    *,
    token: str | None = None,
    workers: int | None = None,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app; the verifier pool starts with the app (lifespan) and stops with it."""
    state: dict[str, LocalVerifierPool] = {}
    n_workers = workers or cfg.num_workers
    queue_limit = 4 * max_items  # beyond this backlog, answer 503 instead of queueing without end

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):  # type: ignore[no-untyped-def]
        state["pool"] = await asyncio.to_thread(LocalVerifierPool, cfg, n_workers)
        try:
            yield
        finally:
            await asyncio.to_thread(state["pool"].close)

    app = FastAPI(
        title="duet reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )

    def fail(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        pool = state.get("pool")
        if pool is None or not pool.alive():
            return fail(503, "verifier pool not serving")
        return JSONResponse(
            {"ok": True, "workers": n_workers, "backlog": pool.backlog, "served": pool.served}
        )

    # The body is read and checked by hand (streamed size cap, plain JSON); this describes it for
    # clients and for the schema-driven fuzz tests (tests/test_api_fuzz.py). No schema is served.
    verify_schema = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request_schema(max_items)}},
        },
        "responses": {
            str(code): {"description": text}
            for code, text in {
                400: "body is not JSON",
                401: "missing or wrong bearer token",
                413: "body or item count over the limit",
                415: "not application/json",
                422: "items malformed (the message names the item and field)",
                503: "server busy",
            }.items()
        },
    }

    @app.post("/v1/verify", openapi_extra=verify_schema)
    async def verify(request: Request) -> JSONResponse:
        if token is not None:
            auth = request.headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return fail(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return fail(415, "send application/json")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return fail(400, "bad content-length")
            if int(declared) > max_body_bytes:
                return fail(413, f"body larger than {max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: chunked bodies are capped too
            body += chunk
            if len(body) > max_body_bytes:
                return fail(413, f"body larger than {max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # includes invalid UTF-8 (UnicodeDecodeError)
            return fail(400, "body is not valid JSON")
        items, problem = _read_items(data, max_items)
        if problem is not None:
            return fail(413 if problem.startswith("too many") else 422, problem)
        pool = state["pool"]
        if pool.backlog + len(items) > queue_limit:
            return fail(503, "server busy, retry later")
        futures = [pool.submit(it) for it in items]
        results: list[VerifyResult] = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        out = [{"reward": r.reward, "reason": safe_echo(r.reason), "elapsed_s": r.elapsed_s} for r in results]
        return JSONResponse({"results": out})

    return app


def request_schema(max_items: int = DEFAULT_MAX_ITEMS) -> dict:
    """JSON Schema of a `POST /v1/verify` body, as `_read_items` checks it."""
    item = {
        "type": "object",
        "required": ["completion", "reference"],
        "properties": {
            "completion": {"type": "string"},
            "reference": {"type": "string"},
            "verifier": {"type": "string", "enum": list(LOCAL_VERIFIERS)},
            "prompt": {"type": "string"},
        },
    }
    return {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "maxItems": max_items, "items": item}},
    }


def _read_items(data: Any, max_items: int) -> tuple[list[VerifyItem], str | None]:
    """Validate the request by hand: plain types only, and a clear message naming the bad field."""
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        return [], 'expected {"items": [...]}'
    rows = data["items"]
    if len(rows) > max_items:
        return [], f"too many items: {len(rows)} > {max_items}"
    items = []
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            return [], f"items[{k}] is not an object"
        verifier = row.get("verifier", "math")
        if verifier not in LOCAL_VERIFIERS:
            return [], f"items[{k}].verifier must be one of {list(LOCAL_VERIFIERS)}"
        fields = {name: row.get(name, "") for name in ("completion", "reference", "prompt")}
        for name in ("completion", "reference"):
            if name not in row:
                return [], f"items[{k}].{name} is missing"
        for name, value in fields.items():
            if not isinstance(value, str):
                return [], f"items[{k}].{name} must be a string"
        items.append(VerifyItem(fields["completion"], fields["reference"], verifier, fields["prompt"]))
    return items, None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="duet serve-reward", description="Serve duet's reward verifiers over HTTP."
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token POST requests must carry (default: ${TOKEN_ENV}); required off loopback",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="verifier processes (default rewards.num_workers)"
    )
    p.add_argument("--config", default=None, help="duet YAML config whose rewards section to use")
    p.add_argument("--timeout-s", type=float, default=None, help="per-item time limit (rewards.timeout_s)")
    p.add_argument(
        "--memory-limit-mib", type=int, default=None, help="child memory cap (rewards.memory_limit_mib)"
    )
    p.add_argument("--max-completion-chars", type=int, default=None, help="rewards.max_completion_chars")
    p.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS, help="items per request, at most")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="request body cap")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def serve_reward_main(argv: list[str] | None = None) -> int:
    """`duet serve-reward`: parse arguments, check them, serve until interrupted; the exit status."""
    args = _parser().parse_args(argv)
    token = args.token or None
    if not is_loopback(args.host) and token is None:
        print(
            f"serve-reward: refusing to bind {args.host!r} without a token: anyone who can reach it could "
            f"use it. Pass --token or set {TOKEN_ENV}, or bind 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    if args.workers is not None and args.workers < 1:
        print("serve-reward: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        base = load_config(args.config).rewards if args.config else RewardsConfig()
        update = {
            k: v
            for k, v in {
                "timeout_s": args.timeout_s,
                "memory_limit_mib": args.memory_limit_mib,
                "max_completion_chars": args.max_completion_chars,
            }.items()
            if v is not None
        }
        cfg = RewardsConfig.model_validate({**base.model_dump(), **update})
    except (ConfigError, ValueError, OSError) as e:
        print(f"serve-reward: {e}", file=sys.stderr)
        return 2
    import uvicorn

    app = make_app(
        cfg, token=token, workers=args.workers, max_items=args.max_items, max_body_bytes=args.max_body_bytes
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(serve_reward_main(None))

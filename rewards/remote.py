"""The `remote` verifier: a client of a duet reward server (`duet serve-reward`, rewards/server.py).

It sends items in batches over HTTP (JSON only, bearer token if configured), at most `concurrency`
requests at a time, each bounded by a time limit and retried (with backoff) on transport errors,
timeouts, 429 and 5xx. Whatever happens, each item gets exactly one VerifyResult: a batch that
still fails after its retries scores its items 0 with `error: remote ...`. Nothing from the network
is unpickled: the answer is JSON, checked field by field.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from cluster.records import VerifyItem, VerifyResult
from rewards.verifiers import safe_echo

_RETRY_STATUS = {429, 500, 502, 503, 504}


class RemoteVerifier:
    """HTTP client of `POST /v1/verify`; thread-safe.

    `timeout_s` is the server's per-item limit; a request's own limit is, unless given,
    10 s + len(batch) × (timeout_s + 0.5): enough for a batch of hostile items run sequentially.
    Items of verifier `remote` are sent as `math` (the server runs its own configured verifiers).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        concurrency: int = 4,
        retries: int = 2,
        timeout_s: float = 5.0,
        max_completion_chars: int = 20000,
        batch_size: int = 32,
        request_timeout_s: float | None = None,
        backoff_s: float = 0.2,
    ) -> None:
        self.url = url.rstrip("/") + "/v1/verify"
        self.retries = retries
        self.timeout_s = timeout_s
        self.max_completion_chars = max_completion_chars
        self.batch_size = max(1, batch_size)
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._client = httpx.Client(headers=headers, limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reward-remote-http")
        self._closed = threading.Event()

    @classmethod
    def from_config(cls, cfg: Any) -> RemoteVerifier:
        """Build from RewardsConfig (remote_url, the token's file or variable, remote_concurrency...).

        The token is read here, in the process that sends the requests, every time a run starts: a
        resumed run reads the same file or variable again (config.yaml holds only their names).
        """
        if not cfg.remote_url:
            raise ValueError("rewards.remote_url is not set")
        return cls(
            cfg.remote_url,
            token=resolve_remote_token(cfg),
            concurrency=cfg.remote_concurrency,
            retries=cfg.remote_retries,
            timeout_s=cfg.timeout_s,
            max_completion_chars=cfg.max_completion_chars,
        )

    def score(self, items: list[VerifyItem]) -> list[VerifyResult]:
        """One result per item, in order; blocks until every batch answered or ran out of retries."""
        results: list[VerifyResult | None] = [None] * len(items)
        send: list[int] = []
        for i, it in enumerate(items):
            if isinstance(it.completion, str) and len(it.completion) > self.max_completion_chars:
                results[i] = VerifyResult(0.0, "too_long", 0.0, {"chars": len(it.completion)})
            else:
                send.append(i)
        batches = [send[i : i + self.batch_size] for i in range(0, len(send), self.batch_size)]
        futures = [self._pool.submit(self._post, [items[i] for i in b]) for b in batches]
        for b, fut in zip(batches, futures, strict=True):
            for i, r in zip(b, fut.result(), strict=True):
                results[i] = r
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # ------------------------------------------------------------ internals

    def _post(self, batch: list[VerifyItem]) -> list[VerifyResult]:
        t0 = time.perf_counter()
        body = {
            "items": [
                {
                    "completion": _text(it.completion),
                    "reference": _text(it.reference),
                    "verifier": "math" if it.verifier == "remote" else it.verifier,
                    "prompt": _text(it.prompt),
                }
                for it in batch
            ]
        }
        # ensure_ascii: lone surrogates travel as \u escapes (httpx's own encoder would raise on them).
        content = json.dumps(body, ensure_ascii=True).encode("ascii")
        limit = self.request_timeout_s or (10.0 + len(batch) * (self.timeout_s + 0.5))
        error = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            if self._closed.is_set():
                error = "client closed"
                break
            try:
                resp = self._client.post(self.url, content=content, timeout=limit)
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}"
                continue
            if resp.status_code in _RETRY_STATUS:
                error = f"HTTP {resp.status_code}"
                continue
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {safe_echo(resp.text, 120)}"
                break  # 400/401/413/415/422: the same request would fail again
            try:
                return _parse_results(resp.content, len(batch))
            except ValueError as e:
                error = f"bad response: {safe_echo(str(e), 120)}"
                break
        elapsed = time.perf_counter() - t0
        return [VerifyResult(0.0, f"error: remote {error}", elapsed) for _ in batch]


def resolve_remote_token(cfg: Any) -> str | None:
    """The remote server's bearer token from `rewards.remote_token_file` or `rewards.remote_token_env`.

    Raises ConfigError naming the field when the configured source is missing or empty: a run that
    would send every request without its token would score every item 401, silently.
    """
    from cluster.config import ConfigError, RewardsConfig

    if cfg.remote_token_file:
        path = os.path.expanduser(cfg.remote_token_file)
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"rewards.remote_token_file: cannot read {cfg.remote_token_file!r} ({type(e).__name__}): "
                "give a readable file whose first line is the token"
            ) from None
        if not token:
            raise ConfigError(
                f"rewards.remote_token_file: {cfg.remote_token_file!r} is empty: its first line must be the token"
            )
        return token
    token = os.environ.get(cfg.remote_token_env, "").strip()
    if token:
        return token
    if cfg.remote_token_env != RewardsConfig.model_fields["remote_token_env"].default:
        raise ConfigError(
            f"rewards.remote_token_env: the environment variable {cfg.remote_token_env} is not set (or empty) "
            "in the driver's environment: export it before starting the run, or use rewards.remote_token_file"
        )
    return None


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _parse_results(raw: bytes, n: int) -> list[VerifyResult]:
    """Check the server's JSON field by field: a reward must be a finite number, a reason a string."""
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError("no results list")
    rows = data["results"]
    if len(rows) != n:
        raise ValueError(f"{len(rows)} results for {n} items")
    out = []
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError("a result is not an object")
        reward, reason, elapsed = row.get("reward"), row.get("reason"), row.get("elapsed_s", 0.0)
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise ValueError("a reward is not a finite number")
        if not isinstance(reason, str) or not isinstance(elapsed, (int, float)):
            raise ValueError("a reason is not a string")
        out.append(VerifyResult(float(reward), safe_echo(reason), float(elapsed)))
    return out

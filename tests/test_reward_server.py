"""The HTTP reward server, started for real (`python -m rewards.server` on a loopback port), and the
`remote` verifier client against it. Real uvicorn, real sockets, real sandbox children; no Ray.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from cluster.records import VerifyItem
from rewards.remote import RemoteVerifier
from rewards.server import is_loopback, serve_reward_main
from tests.helpers import free_port, integration_fixture, reward_server

TOKEN = "test-token-123"
MAX_BODY = 256 * 1024
MAX_ITEMS = 64
SLOW = "\\boxed{" + "(" * 60 + "1" + ")" * 60 + "}"


@integration_fixture(scope="module")
def server() -> str:
    args = [
        "--workers",
        "2",
        "--timeout-s",
        "1",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-items",
        str(MAX_ITEMS),
    ]
    env = dict(os.environ, DUET_REWARD_TOKEN=TOKEN)  # the token from the environment, not argv
    with reward_server(*args, env=env, start_timeout_s=60) as url:
        yield url


def post(url: str, body: object, token: str | None = TOKEN, **kw: object) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    content = json.dumps(body) if isinstance(body, (dict, list)) else body
    return httpx.post(f"{url}/v1/verify", content=content, headers=headers, timeout=30, **kw)


def test_health(server: str) -> None:
    r = httpx.get(f"{server}/healthz", timeout=5)
    assert r.status_code == 200 and r.json()["ok"] is True


def test_verify_keeps_order(server: str) -> None:
    items = []
    for i in range(30):
        items.append({"completion": f"\\boxed{{{i}}}", "reference": str(i if i % 2 else i + 1)})
    items[7] = {"completion": SLOW, "reference": "1", "verifier": "math"}
    items[11] = {"completion": "\\boxed{4}", "reference": "4", "verifier": "format"}
    r = post(server, {"items": items})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 30
    for i, res in enumerate(results):
        assert set(res) == {"reward", "reason", "elapsed_s"}
        if i == 7:
            assert res["reason"] == "timeout" and res["elapsed_s"] <= 1.5
        elif i == 11:
            assert res["reason"] == "correct"
        else:
            assert res["reason"] == ("correct" if i % 2 else "wrong"), (i, res)


def test_untrusted_text_survives_json(server: str) -> None:
    # Lone surrogates and control characters arrive as JSON escapes; nothing may crash.
    body = '{"items": [{"completion": "\\ud800\\u0000\\\\boxed{1}\\udfff", "reference": "1"}]}'
    r = post(server, body)
    assert r.status_code == 200 and r.json()["results"][0]["reason"] == "correct"
    r = post(server, b'{"items": [{"completion": "\xff\xfe", "reference": "1"}]}')  # invalid UTF-8
    assert r.status_code == 400


def test_token_required(server: str) -> None:
    body = {"items": [{"completion": "\\boxed{1}", "reference": "1"}]}
    assert post(server, body, token=None).status_code == 401
    r = post(server, body, token="wrong")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert post(server, body).status_code == 200


def test_limits_and_bad_requests(server: str) -> None:
    big = {"items": [{"completion": "1" * (MAX_BODY + 10), "reference": "1"}]}
    assert post(server, big).status_code == 413  # declared content-length

    def chunks():  # no content-length: the cap must hold while streaming
        yield b'{"items": [{"completion": "'
        for _ in range(MAX_BODY // 8192 + 2):
            yield b"1" * 8192
        yield b'", "reference": "1"}]}'

    assert post(server, chunks()).status_code == 413
    many = {"items": [{"completion": "\\boxed{1}", "reference": "1"}] * (MAX_ITEMS + 1)}
    assert post(server, many).status_code == 413
    r = httpx.post(
        f"{server}/v1/verify",
        content=b"items=1",
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415
    assert post(server, b"{not json").status_code == 400
    assert post(server, {"items": [{"completion": 1, "reference": "1"}]}).status_code == 422
    assert (
        post(server, {"items": [{"completion": "a", "reference": "1", "verifier": "remote"}]}).status_code
        == 422
    )
    assert post(server, {"nope": []}).status_code == 422
    assert httpx.get(f"{server}/docs").status_code == 404  # no API explorer on an exposed port


def test_remote_client_against_server(server: str) -> None:
    client = RemoteVerifier(
        server, token=TOKEN, concurrency=3, timeout_s=1.0, batch_size=4, max_completion_chars=500
    )
    try:
        items = [
            VerifyItem(f"\\boxed{{{i}}}", str(i if i % 3 else i + 1), verifier="remote") for i in range(25)
        ]
        items.append(VerifyItem("x" * 501, "1", verifier="remote"))  # too long: never sent
        items.append(VerifyItem("\ud800\\boxed{1}", "1", verifier="remote"))  # lone surrogate
        results = client.score(items)
        assert len(results) == 27
        for i, r in enumerate(results[:25]):
            assert r.reason == ("correct" if i % 3 else "wrong"), (i, r)
        assert results[25].reason == "too_long"
        assert results[26].reason == "correct"
    finally:
        client.close()
    bad = RemoteVerifier(server, token="wrong", retries=2, backoff_s=0.01)
    try:
        assert bad.score([VerifyItem("\\boxed{1}", "1")])[0].reason == "error: remote HTTP 401: " + (
            '{"error":"missing or wrong bearer token"}'
        )
    finally:
        bad.close()


def test_remote_client_retries_then_scores_zero() -> None:
    client = RemoteVerifier(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01)  # nobody listens
    try:
        t0 = time.perf_counter()
        results = client.score([VerifyItem("\\boxed{1}", "1"), VerifyItem("\\boxed{2}", "2")])
        assert [r.reason for r in results] == ["error: remote ConnectError"] * 2
        assert all(r.reward == 0.0 for r in results) and time.perf_counter() - t0 < 10
    finally:
        client.close()


def test_refuses_public_bind_without_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("DUET_REWARD_TOKEN", raising=False)
    assert serve_reward_main(["--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "refusing" in capsys.readouterr().err
    assert serve_reward_main(["--workers", "0"]) == 2
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")


# ---------------------------------------------------------------- the client's token across --resume


def _resumed_rewards(tmp_path: Path, overrides: list[str]):
    """Write the run's config.yaml as the driver does, and load it back as `duet train --resume` does."""
    from cluster.config import load_config
    from cluster.runtime import write_config

    write_config(tmp_path, load_config(None, overrides))
    return load_config(tmp_path / "config.yaml").rewards


def _score_remote(rewards_cfg, n: int = 4) -> list[str]:
    client = RemoteVerifier.from_config(rewards_cfg)
    try:
        items = [VerifyItem(f"\\boxed{{{i}}}", str(i), verifier="remote") for i in range(n)]
        return [r.reason for r in client.score(items)]
    finally:
        client.close()


def test_resumed_run_keeps_the_reward_token_from_the_environment(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11, finding 3: config.yaml holds no token, yet a resumed run must send the same one.

    The driver's environment holds it (DUET_REWARD_TOKEN, the variable the server reads too); the
    client reads it again at every start. Before, the token came only from the config and a resumed
    run scored every item `error: remote HTTP 401`."""
    monkeypatch.setenv("DUET_REWARD_TOKEN", TOKEN)
    resumed = _resumed_rewards(tmp_path, ["rewards.verifier=remote", f"rewards.remote_url={server}"])
    assert TOKEN not in (tmp_path / "config.yaml").read_text()
    assert _score_remote(resumed) == ["correct"] * 4


def test_resumed_run_keeps_the_reward_token_from_a_file(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DUET_REWARD_TOKEN", raising=False)
    token_file = tmp_path / "reward.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    run = tmp_path / "run"
    run.mkdir()
    overrides = [
        "rewards.verifier=remote",
        f"rewards.remote_url={server}",
        f"rewards.remote_token_file={token_file}",
    ]
    resumed = _resumed_rewards(run, overrides)
    assert TOKEN not in (run / "config.yaml").read_text()
    assert resumed.remote_token_file == str(token_file)
    assert _score_remote(resumed) == ["correct"] * 4
    # A variable named by hand must exist: a run without its token would score every item 401.
    from cluster.config import ConfigError, load_config

    named = load_config(None, [f"rewards.remote_url={server}", "rewards.remote_token_env=MY_REWARD_TOKEN"])
    with pytest.raises(
        ConfigError, match=r"rewards\.remote_token_env: the environment variable MY_REWARD_TOKEN"
    ):
        RemoteVerifier.from_config(named.rewards)
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match=r"rewards\.remote_token_file: .* is empty"):
        RemoteVerifier.from_config(resumed)
    token_file.unlink()
    with pytest.raises(ConfigError, match=r"rewards\.remote_token_file: cannot read"):
        RemoteVerifier.from_config(resumed)

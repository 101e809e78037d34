"""The control API's HTTP layer on a real loopback port, and the `duet status` / `duet scale` clients.

The controller here is a plain recorder; the driver's real controller is tested end to end elsewhere.
"""

from __future__ import annotations

import json
import stat
import threading

import httpx
import pytest

from cluster.cli import main as duet
from cluster.control import ControlServer, status_main, write_control_file
from tests.helpers import integration_fixture

TOKEN = "s3cret-token"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def _note(self, *call) -> None:
        with self.lock:
            self.calls.append(call)

    def status(self) -> dict:
        return {"step": 3, "policy_version": 3, "engines": {"0": 3}, "queue": {"depth": 0}}

    def scale(self, engines: int) -> dict:
        if engines > 8:
            raise ValueError("at most 8 engines fit")
        self._note("scale", engines)
        return {"accepted": True, "request_id": len(self.calls)}

    def pause(self) -> dict:
        self._note("pause")
        return {"paused": True}

    def resume(self, steps: int | None = None) -> dict:
        self._note("resume", *([steps] if steps else []))
        return {"paused": False}

    def checkpoint(self) -> dict:
        self._note("checkpoint")
        return {"accepted": True, "request_id": len(self.calls)}


@integration_fixture(scope="module")
def served():  # a real uvicorn listening on loopback
    controller = Recorder()
    server = ControlServer(controller, "127.0.0.1", 0, TOKEN)
    url = server.start()
    yield url, controller
    server.stop()


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_status_needs_no_token(served):
    url, _ = served
    r = httpx.get(f"{url}/status")
    assert r.status_code == 200 and r.json()["step"] == 3


@pytest.mark.parametrize("path", ["/scale", "/pause", "/resume", "/checkpoint"])
def test_state_changes_need_the_token(served, path):
    url, controller = served
    before = list(controller.calls)
    body = {"engines": 2} if path == "/scale" else None
    assert httpx.post(f"{url}{path}", json=body).status_code == 401
    assert httpx.post(f"{url}{path}", json=body, headers=auth("wrong")).status_code == 401
    assert httpx.post(f"{url}{path}", json=body, headers={"Authorization": TOKEN}).status_code == 401
    assert controller.calls == before  # refused calls never reach the controller
    r = httpx.post(f"{url}{path}", json=body, headers=auth())
    assert r.status_code == 200, r.text
    assert controller.calls[-1][0] == path[1:]


def test_scale_body_is_checked(served):
    url, controller = served
    r = httpx.post(f"{url}/scale", json={"engines": 3}, headers=auth())
    assert r.json()["accepted"] is True and controller.calls[-1] == ("scale", 3)
    for bad in ({"engines": 0}, {"engines": "2"}, {"engines": True}, {}, {"engines": 2, "x": 1}):
        assert httpx.post(f"{url}/scale", json=bad, headers=auth()).status_code == 422, bad
    r = httpx.post(f"{url}/scale", content=b"engines=2", headers=auth())
    assert r.status_code == 415
    r = httpx.post(f"{url}/scale", json={"engines": 9}, headers=auth())  # the controller says no
    assert r.status_code == 400 and "at most 8" in r.json()["detail"]
    assert httpx.post(f"{url}/pause", json={"now": True}, headers=auth()).status_code == 422
    assert httpx.post(f"{url}/resume", json={"steps": 2}, headers=auth()).status_code == 200
    assert controller.calls[-1] == ("resume", 2)
    for bad in (
        {"steps": 0},
        {"steps": "1"},
        {"steps": True},
        {"steps": 1.5},
        {"steps": 1, "x": 1},
        {"x": 1},
    ):
        assert httpx.post(f"{url}/resume", json=bad, headers=auth()).status_code == 422, bad


def test_large_body_is_refused(served):
    url, controller = served
    before = list(controller.calls)
    big = {"engines": 2, "pad": "x" * 10_000}
    assert httpx.post(f"{url}/scale", json=big, headers=auth()).status_code == 413

    def chunks():  # no Content-Length: the cap holds while reading
        for _ in range(10):
            yield b" " * 1000

    assert httpx.post(f"{url}/scale", content=chunks(), headers=auth()).status_code == 413
    assert controller.calls == before


def test_non_loopback_without_token_is_refused():
    with pytest.raises(ValueError, match="needs a token"):
        ControlServer(Recorder(), "0.0.0.0", 0, None)
    ControlServer(Recorder(), "127.0.0.1", 0, None)  # loopback may go without


def test_control_file_is_private(tmp_path):
    path = write_control_file(tmp_path, "http://127.0.0.1:1234", TOKEN)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["token"] == TOKEN


def test_cli_clients(served, tmp_path, capsys, monkeypatch):
    url, controller = served
    monkeypatch.delenv("DUET_CONTROL_TOKEN", raising=False)
    monkeypatch.delenv("DUET_CONTROL_URL", raising=False)
    assert duet(["status", "--url", url]) == 0
    assert json.loads(capsys.readouterr().out)["policy_version"] == 3

    assert duet(["scale", "--engines", "2", "--url", url]) == 1  # no token
    assert "unauthorized" in capsys.readouterr().err
    assert duet(["scale", "--engines", "2", "--url", url, "--token", TOKEN]) == 0
    assert json.loads(capsys.readouterr().out)["accepted"] is True
    assert controller.calls[-1] == ("scale", 2)

    write_control_file(tmp_path, url, TOKEN)  # as the driver does: URL and token from the run dir
    assert duet(["scale", "--engines", "4", "--run-dir", str(tmp_path)]) == 0
    assert controller.calls[-1] == ("scale", 4)
    capsys.readouterr()
    assert status_main(["--run-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3

    monkeypatch.setenv("DUET_CONTROL_TOKEN", TOKEN)
    assert duet(["scale", "--engines", "5", "--url", url]) == 0
    assert controller.calls[-1] == ("scale", 5)

"""Schema-driven fuzzing (schemathesis) of the two HTTP APIs, served for real on loopback ports:
`duet serve-reward` (`python -m rewards.server`, real sandbox children) and the driver's control API
(cluster.control.make_app under the real ControlServer, answering for the driver's real RunControl, whose
queued requests a thread applies as the training loop does).

Each operation of each app's own OpenAPI description gets requests that fit it (positive) and
requests that break it (negative: wrong types, missing fields, out-of-range numbers...), plus raw
byte bodies and nesting the schema cannot express. Promises checked (issue 11, "Bad input, generated"):
no answer is a 5xx, and without the token no call changes any state.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from cluster.config import RewardsConfig
from cluster.control import MAX_BODY_BYTES, ControlServer, RunControl
from cluster.control import make_app as make_control_app
from rewards.server import make_app as make_reward_app
from tests.helpers import REPO as ROOT
from tests.helpers import free_port

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token-0123"
EXAMPLES = int(os.environ.get("DUET_FUZZ_EXAMPLES", "60"))  # per operation and mode
REWARD_MAX_ITEMS = 4  # keeps the positive /v1/verify cases quick: each item is really verified
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


class DrivenControl:
    """The driver's own controller, `RunControl`, driven by a thread as the training loop drives it: before
    each step the queued requests are applied (`RunControl.apply`, which holds while paused), after it the
    step is published (`RunControl.publish`, which counts `POST /resume {"steps": N}` down). The scale and
    checkpoint callbacks record what was applied, so a request that should have been refused shows."""

    def __init__(self, run_dir: Path, max_engines: int = 8) -> None:
        self.control = RunControl(run_dir, max_engines=max_engines)
        self.scaled: list[int] = []
        self.checkpoints: list[str] = []
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fuzz-loop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.control.apply(self.scaled.append, self._checkpoint)
            self.steps += 1
            self.control.publish(self.steps, 10**9, self.steps, {0: self.steps}, {"train/loss": 0.0})
            time.sleep(0.002)

    def _checkpoint(self) -> Path:
        path = Path(self.control.run_dir) / "checkpoints" / f"step_{self.steps:06d}"
        self.checkpoints.append(str(path))
        return path

    def drained(self) -> None:
        """Until every request queued so far has been applied: the loop has gone round twice (not paused)."""
        seen = self.steps
        deadline = time.monotonic() + 30
        while self.steps < seen + 2:
            assert time.monotonic() < deadline, "the loop did not go round"
            time.sleep(0.01)

    def snapshot(self) -> tuple:
        """What a state-changing call changes: the pause, the steps left before it, what was applied."""
        status = self.control.status()
        return (status["paused"], status.get("steps_before_pause"), len(self.scaled), len(self.checkpoints))

    def stop(self) -> None:
        self._stop.set()
        self.control.resume()  # a paused loop holds inside apply
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def control_api(tmp_path_factory):
    driven = DrivenControl(tmp_path_factory.mktemp("run"))
    server = ControlServer(driven.control, "127.0.0.1", 0, TOKEN)
    url = server.start()
    yield url, driven
    server.stop()
    driven.stop()


@pytest.fixture(scope="module")
def reward_api() -> str:
    port = free_port()
    cmd = [
        sys.executable, "-m", "rewards.server", "--port", str(port), "--workers", "1", "--timeout-s", "1",
        "--max-items", str(REWARD_MAX_ITEMS), "--max-body-bytes", str(64 * 1024),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, DUET_REWARD_TOKEN=TOKEN))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "the reward server exited during startup"
            try:
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the reward server did not become healthy"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fuzz(raw_schema: dict, base_url: str, headers: dict[str, str], seen: list) -> None:
    """Send EXAMPLES positive and EXAMPLES negative cases of every operation; record each answer."""
    schema = schemathesis.openapi.from_dict(raw_schema)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the app describes no operation"
    for operation in operations:
        described = raw_schema["paths"][operation.path][operation.method.lower()]
        takes_input = "requestBody" in described or bool(described.get("parameters"))
        # An operation that takes no input (GET /status, POST /pause) has no negative case to make.
        modes = (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,)
        )
        for mode in modes:
            label = (operation.method.upper(), operation.path, mode.value)
            _send_cases(operation.as_strategy(generation_mode=mode), label, base_url, headers, seen)


def _send_cases(strategy, label: tuple, base_url: str, headers: dict[str, str], seen: list) -> None:
    @FUZZ_SETTINGS
    @given(case=strategy)
    def send(case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        seen.append((*label, response.status_code))
        assert response.status_code < 500, (case.as_curl_command(), response.text[:300])

    send()


def _summary(seen: list) -> str:
    counts: dict[tuple, int] = {}
    for method, path, mode, code in seen:
        counts[(method, path, mode, code)] = counts.get((method, path, mode, code), 0) + 1
    return ", ".join(f"{m} {p} {mode} {code}: {n}" for (m, p, mode, code), n in sorted(counts.items()))


# ---------------------------------------------------------------- the control API


def test_control_api_fuzzed_with_token(control_api) -> None:
    url, driven = control_api
    seen: list = []
    fuzz(make_control_app(driven.control, TOKEN).openapi(), url, {"Authorization": f"Bearer {TOKEN}"}, seen)
    driven.control.resume()  # the fuzz may have left the loop paused, holding requests it has not applied
    driven.drained()
    print(
        f"control API with token: {len(seen)} requests; {_summary(seen)}; applied: {len(driven.scaled)} scale, "
        f"{len(driven.checkpoints)} checkpoint requests over {driven.steps} loop steps"
    )
    posts = [code for method, _, _, code in seen if method == "POST"]
    assert 200 in posts and any(400 <= code < 500 for code in posts)  # both sides were reached
    # Every scale request accepted reached the loop, and only counts RunControl allows (1..max_engines).
    accepted = sum(1 for method, path, _, code in seen if (method, path, code) == ("POST", "/scale", 200))
    assert len(driven.scaled) == accepted > 0, (len(driven.scaled), accepted)
    assert all(1 <= n <= driven.control.max_engines for n in driven.scaled), sorted(set(driven.scaled))
    assert driven.checkpoints, "no checkpoint request reached the loop"


def test_control_api_fuzzed_without_token_changes_nothing(control_api) -> None:
    url, driven = control_api
    driven.control.resume()
    driven.drained()
    before = driven.snapshot()
    seen: list = []
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
        fuzz(make_control_app(driven.control, TOKEN).openapi(), url, headers, seen)
    driven.drained()  # a request that got through would have been applied by now
    print(f"control API without token: {len(seen)} requests; {_summary(seen)}")
    assert all(code == 401 for method, _, _, code in seen if method == "POST"), _summary(seen)
    assert driven.snapshot() == before


@FUZZ_SETTINGS
@given(
    body=st.binary(max_size=MAX_BODY_BYTES + 64),
    path=st.sampled_from(["/scale", "/pause", "/resume", "/checkpoint"]),
)
def test_control_api_raw_bodies(control_api, body: bytes, path: str) -> None:
    url, _ = control_api
    headers = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    assert httpx.post(url + path, content=body, headers=headers, timeout=30).status_code < 500


def test_control_api_deep_nesting_is_a_client_error(control_api) -> None:
    """JSON nested deeper than the parser's recursion limit fits in the 4 KiB body cap."""
    url, driven = control_api
    driven.control.resume()
    driven.drained()
    before = driven.snapshot()
    headers = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    for body in ("[" * 4000, '{"engines": ' + "[" * 3000 + "]" * 3000 + "}", "[" * 2000 + "]" * 2000):
        r = httpx.post(url + "/scale", content=body, headers=headers, timeout=30)
        assert 400 <= r.status_code < 500, (body[:20], r.status_code, r.text[:200])
    driven.drained()
    assert driven.snapshot() == before


# ---------------------------------------------------------------- the reward server


def _served(url: str) -> int:
    return httpx.get(f"{url}/healthz", timeout=10).json()["served"]


def test_reward_server_fuzzed_with_token(reward_api: str) -> None:
    seen: list = []
    schema = make_reward_app(RewardsConfig(), max_items=REWARD_MAX_ITEMS).openapi()
    fuzz(schema, reward_api, {"Authorization": f"Bearer {TOKEN}"}, seen)
    print(f"reward server with token: {len(seen)} requests; {_summary(seen)}")
    posts = [code for method, _, _, code in seen if method == "POST"]
    assert 200 in posts and any(400 <= code < 500 for code in posts)


def test_reward_server_fuzzed_without_token_does_no_work(reward_api: str) -> None:
    served = _served(reward_api)
    seen: list = []
    schema = make_reward_app(RewardsConfig(), max_items=REWARD_MAX_ITEMS).openapi()
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        fuzz(schema, reward_api, headers, seen)
    print(f"reward server without token: {len(seen)} requests; {_summary(seen)}")
    assert all(code == 401 for method, _, _, code in seen if method == "POST"), _summary(seen)
    assert _served(reward_api) == served


@FUZZ_SETTINGS
@given(body=st.binary(max_size=4096))
def test_reward_server_raw_bodies(reward_api: str, body: bytes) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    assert httpx.post(f"{reward_api}/v1/verify", content=body, headers=headers, timeout=60).status_code < 500

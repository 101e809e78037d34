"""A local `duet train` as a user sees it: the Ray dashboard in a real browser (headless Chromium),
behind Ray's token, showing the run's driver and the duet actors; and the run's trackers.

The run starts paused (`control.start_paused`) while the browser looks, so the actors are alive; then it
resumes and finishes, and W&B (offline), MLflow (file store) and TensorBoard are read back.
Screenshots go to DUET_TEST_ARTIFACTS (default: the test's tmp folder).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from cluster.metrics import read_metrics
from cluster.trackers import mlflow_key, scalars
from tests.helpers import REPO, duet_cmd, kill_run_and_its_ray
from tests.trackers_readback import mlflow_run, tensorboard_scalars, wandb_offline_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DUET_ACTORS = ("RolloutEngine", "LearnerWorker", "RewardWorker", "ReplayQueue")
# (the end of an actor's Ray name, the start of its repr) for each duet actor of a default local run
NAMED = (
    ("/engine-0", "RolloutEngine(engine 0, started at version 0, node "),
    ("/learner-rank-0", "LearnerWorker(learner rank 0 of 1, node "),
    ("/reward-worker-1", "RewardWorker(reward worker 1, node "),
    ("/replay-queue-0", "ReplayQueue(capacity 1024 groups"),
)


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        why = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(why)  # .ci/run installs them: missing there is a bug
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager try to download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(cond, timeout_s: float, what: str, run: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if run is not None and run.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.returncode}) while waiting for {what}")
        try:
            value = cond()
        except Exception:  # a page still rendering, a file half written
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_dashboard_in_a_browser_and_trackers_on_a_local_run(tmp_path, model_cache, tiny_model, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    artifacts = Path(os.environ.get("DUET_TEST_ARTIFACTS") or tmp_path / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    run, token, store = tmp_path / "run", secrets.token_hex(32), f"file:{tmp_path / 'mlruns'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_", "MLFLOW_"))}
    env.update(
        RAY_AUTH_TOKEN=token,  # Ray's own variable: this run's token, ~/.ray/auth_token left alone
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        MLFLOW_TRACKING_URI=store,
        MLFLOW_ALLOW_FILE_STORE="true",
    )
    stderr = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        duet_cmd(
            "train", "--run-dir", str(run), f"model.cache_dir={model_cache}", "train.steps=6",
            "rollout.prompts_per_step=8", "run.loggers=[tensorboard,wandb,mlflow]", "checkpoint.final=false",
            "control.start_paused=true",
        ),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True,
    )  # fmt: skip
    browser = None
    try:
        info = _wait(lambda: json.loads((run / "dashboard.json").read_text()), 300, "dashboard.json", proc)
        assert info["local"] and info["auth"] == "token" and info["url"].startswith("http://127.0.0.1:")
        assert token not in (run / "dashboard.json").read_text()  # where the token is, never the token
        url = info["url"]
        assert httpx.get(f"{url}/api/jobs/", timeout=10).status_code == 401  # the token guards it

        # The run starts paused (control.start_paused), so every actor is alive while the browser looks;
        # control.json appears once every actor has started.
        control = _wait(lambda: json.loads((run / "control.json").read_text()), 300, "control.json", proc)
        auth = {"Authorization": f"Bearer {control['token']}"}

        # Issue 22, item 16: each actor has a name and a repr a user can search for, in Ray's own state API
        # (what the Actors page shows in its Name and Repr columns).
        listed = httpx.get(
            f"{url}/api/v0/actors", params={"detail": "1", "limit": "100"},
            headers={"Authorization": f"Bearer {token}"}, timeout=30,
        ).json()["data"]["result"]["result"]  # fmt: skip
        alive = {a["name"]: a.get("repr_name", "") for a in listed if a["state"] == "ALIVE"}
        for name, repr_start in NAMED:
            found = [n for n in alive if n.endswith(name)]
            assert found and alive[found[0]].startswith(repr_start), (name, alive)
        assert all(n.startswith(f"{run.name}/") for n in alive if n), alive  # the run's own scope

        browser = _browser()
        browser.get(url)
        # Ray's dashboard asks for the token in a dialog and keeps it in a cookie.
        field = _wait(
            lambda: browser.find_element(
                By.CSS_SELECTOR, "input[placeholder='Enter your authentication token']"
            ),
            120,
            "the token dialog",
        )
        # The dialog fades in: its field can be found before its title is visible text.
        _wait(
            lambda: "Authentication Token Required" in browser.find_element(By.TAG_NAME, "body").text,
            30,
            "the token dialog's title",
        )
        browser.save_screenshot(str(artifacts / "dashboard-token-dialog.png"))
        field.send_keys(token, Keys.ENTER)
        _wait(lambda: browser.get_cookie("ray-authentication-token"), 60, "the dashboard's token cookie")

        browser.get(f"{url}/#/jobs")
        jobs = _wait(
            lambda: (t := browser.find_element(By.TAG_NAME, "body").text) and "train --run-dir" in t and t,
            120,
            "the run's driver on the Jobs page",
        )
        (artifacts / "dashboard-jobs.txt").write_text(jobs)
        assert "RUNNING" in jobs, jobs[-2000:]
        browser.save_screenshot(str(artifacts / "dashboard-jobs.png"))

        browser.get(f"{url}/#/actors")
        page = _wait(
            lambda: (
                (t := browser.find_element(By.TAG_NAME, "body").text)
                and all(name in t for name in DUET_ACTORS)
                and t
            ),
            120,
            "the duet actors on the Actors page",
        )
        (artifacts / "dashboard-actors.txt").write_text(page)
        for name, repr_start in NAMED:  # the Name and Repr columns are no longer "-"
            assert name in page and repr_start in page, (name, page[-3000:])
        rows = {name: [line for line in page.splitlines() if name in line] for name in DUET_ACTORS}
        assert "ALIVE" in page, page[-3000:]
        browser.save_screenshot(str(artifacts / "dashboard-actors.png"))
        # Each class's row carries its state; the table shows it in its State column.
        state_cells = browser.find_elements(By.XPATH, "//td[normalize-space()='ALIVE']")
        assert len(state_cells) >= len(DUET_ACTORS), rows

        assert httpx.post(f"{control['url']}/resume", headers=auth, timeout=10).status_code == 200
        assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        if browser is not None:
            browser.quit()
        kill_run_and_its_ray(proc, token)
        stderr.close()

    err = (tmp_path / "stderr.txt").read_text()
    lines = [line for line in err.splitlines() if line.startswith("Ray dashboard")]
    assert len(lines) == 1 and url in lines[0] and "ray get-auth-token" in lines[0], err[-3000:]
    assert "View the dashboard at" not in err  # Ray's own line would say it a second time
    assert token not in err

    # The trackers: the same names and values as metrics.jsonl, the config, the run's name.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for reading the store back here
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    keys = set().union(*(scalars(m) for m in metrics))  # a reason's count appears from its first step on
    expected = {key: {m["step"]: scalars(m)[key] for m in metrics if key in scalars(m)} for key in keys}
    tb, wb, ml = tensorboard_scalars(run), wandb_offline_run(run), mlflow_run(store, "duet-rl")
    # MLflow: a name that is also a group's (`rollouts` beside `rollouts/extension`) is `rollouts/total` there
    assert "rollouts/total" in ml["history"] and "rollouts" not in ml["history"]
    in_mlflow = {mlflow_key(k, keys): v for k, v in expected.items()}
    for logged, names in ((tb, expected), (wb["history"], expected), (ml["history"], in_mlflow)):
        assert set(logged) == set(names)
        assert all(logged[k] == pytest.approx(v) for k, v in names.items())
    assert wb["name"] == ml["name"] == run.name
    assert wb["config"]["train"]["steps"] == ml["config"]["train"]["steps"] == 6
    assert wb["config"]["control"]["token"] is None

"""Secrets stay secret: tokens planted the ways a user gives them (a token file, environment variables)
show in no file the run writes (but control.json, mode 0600), on no process's command line, and in no
process's environment but the driver's; a token as a command-line override is refused."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import httpx
import pytest

from cluster.cli import main as duet_main
from tests.helpers import REPO, duet_cmd, kill_group, paused_after


@pytest.mark.parametrize("field", ["control.token", "rewards.remote_token"])
def test_a_secret_as_a_command_line_override_is_refused(field, capsys):
    assert duet_main(["train", "--dry-run", f"{field}=s3cret-on-the-command-line"]) == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err and "`ps`" in err and f"{field}_file" in err  # where to put it instead
    assert duet_main(["submit", "--no-upload", f"{field}=s3cret-on-the-command-line"]) == 2
    assert f"{field}:" in capsys.readouterr().err
    assert duet_main(["eval", f"{field}=s3cret-on-the-command-line"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"duet eval: {field}:") and "`ps`" in err and f"{field}_file" in err


def test_control_token_file_is_read_and_checked(tmp_path, capsys):
    from cluster.config import load_config

    token_file = tmp_path / "control-token"
    token_file.write_text("from-a-file\n")
    assert load_config(None, [f"control.token_file={token_file}"]).control.read_token() == "from-a-file"
    missing = tmp_path / "nope"
    assert duet_main(["train", "--dry-run", f"control.token_file={missing}"]) == 2
    assert "control.token_file: cannot read" in capsys.readouterr().err


def _processes() -> dict[int, tuple[bytes, bytes]]:
    """pid -> (command line, environment) of every process this user may read."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = ((entry / "cmdline").read_bytes(), (entry / "environ").read_bytes())
            except OSError:
                pass
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_planted_tokens_leak_nowhere(tmp_path, model_cache, tiny_model):
    control_token, reward_token, unused_token = (f"planted-{secrets.token_hex(12)}" for _ in range(3))
    token_file = tmp_path / "control-token"
    token_file.write_text(control_token + "\n")
    token_file.chmod(0o600)
    run = tmp_path / "run"
    env = dict(os.environ, DUET_REWARD_TOKEN=reward_token, DUET_CONTROL_TOKEN=unused_token)
    p = subprocess.Popen(
        duet_cmd(
            "train",
            "--run-dir",
            str(run),
            f"model.cache_dir={model_cache}",
            "train.steps=3",
            "rollout.prompts_per_step=8",
            "run.progress=false",
            f"control.token_file={token_file}",
            "control.start_paused=true",  # looked at after step 1, held there: every actor is alive
        ),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    planted = [t.encode() for t in (control_token, reward_token, unused_token)]
    try:
        url, auth = paused_after(run, None, p)
        assert httpx.post(f"{url}/resume", json={"steps": 1}, headers=auth).status_code == 200
        paused_after(run, 1, p)
        actors = json.loads((run / "actors.json").read_text())
        driver, seen = actors["driver"], _processes()
        # The scan sees the run's processes (a scan after the run ended would find nothing to leak).
        live = [actors["engines"][0]["pid"], actors["learner"][0], *actors["reward_workers"]]
        assert all(pid in seen for pid in [driver, *live]), (live, driver)
        leaks = []
        for pid, (cmdline, environ) in seen.items():
            for token in planted:
                if token in cmdline:
                    leaks.append(f"pid {pid} command line: {cmdline[:200]!r}")
                if token in environ and pid != driver:
                    leaks.append(f"pid {pid} environment ({cmdline[:120]!r})")
        assert not leaks, leaks
        assert httpx.post(f"{url}/resume", headers=auth).status_code == 200
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    finally:
        kill_group(p)
    # The control API took the token from the file: it is the one in control.json.
    control = run / "control.json"
    assert json.loads(control.read_text())["token"] == control_token
    assert control.stat().st_mode & 0o777 == 0o600
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for token in planted:
                assert token not in data or (path == control and token == planted[0]), (path, token)


def test_ray_starts_without_the_drivers_secret_variables(monkeypatch):
    from cluster.config import Config
    from cluster.runtime import without_secrets

    monkeypatch.setenv("DUET_CONTROL_TOKEN", "c")
    monkeypatch.setenv("DUET_REWARD_TOKEN", "r")
    monkeypatch.setenv("HF_TOKEN", "hub")  # the engines may need it to download a model: left alone
    with without_secrets(Config()):
        assert "DUET_CONTROL_TOKEN" not in os.environ and "DUET_REWARD_TOKEN" not in os.environ
        assert os.environ["HF_TOKEN"] == "hub"
    assert os.environ["DUET_CONTROL_TOKEN"] == "c" and os.environ["DUET_REWARD_TOKEN"] == "r"

"""`duet submit / logs / stop / status --job` against a real Ray head with token authentication on."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cluster import jobs
from cluster.config import load_config
from cluster.jobs import REPO_ROOT, runtime_env, train_args
from cluster.metrics import read_metrics
from tests.helpers import REPO, free_ports, integration_fixture, kill_run_and_its_ray, run_duet


def _kill_ours(proc: subprocess.Popen, token: str) -> None:
    """Stop the head we started: `ray start --block` shuts its processes down on SIGTERM (about 2 s;
    signalling the whole group instead makes it wait ~30 s), then whatever of ours is left."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    kill_run_and_its_ray(proc, token)


def _path_without_this_environment() -> str:
    venv_bin = str(Path(sys.executable).parent)
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)


@integration_fixture(scope="module")
def ray_head():
    # The job's `python` is the head's PATH's: put this interpreter first.
    yield from _ray_head(f"{Path(sys.executable).parent}{os.pathsep}{_path_without_this_environment()}")


@integration_fixture(scope="module")
def bare_ray_head():
    """A head started as `.venv/bin/ray start` from a shell that did not activate the environment."""
    yield from _ray_head(_path_without_this_environment())


def _ray_head(path: str):
    # A short temp dir of its own: Ray's socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="duet-ray-", dir="/tmp")
    token = secrets.token_hex(32)
    gcs, dash, client, agent, agent_grpc, metrics, renv, node, objm = free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The token reaches the head, its job drivers and the clients through the environment;
    # ~/.ray/auth_token is left alone.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=path)
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", "--num-cpus=8", "--object-store-memory=500000000",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--port={gcs}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={renv}", f"--node-manager-port={node}", f"--object-manager-port={objm}",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start"
            try:
                r = httpx.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield address, token, env
    finally:
        _kill_ours(proc, token)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _duet(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_duet(*args, timeout_s=timeout, env=env)


@pytest.mark.integration
@pytest.mark.slow
def test_submit_trains_on_the_cluster_with_auth_on(ray_head, tmp_path, model_cache, tiny_model):
    address, ray_token, env = ray_head
    run_dir = tmp_path / "run"
    # A config file outside the uploaded repository: it travels as a file in the uploaded code, and the
    # secret in it shows neither in the job's entrypoint nor in its runtime env.
    config = tmp_path / "tiny.yaml"
    planted = secrets.token_hex(16)
    config.write_text(
        yaml.safe_dump(
            {"train": {"steps": 2}, "rollout": {"prompts_per_step": 16}, "control": {"token": planted}}
        )
    )
    t0 = time.monotonic()
    proc = _duet(
        env,
        "submit", "--address", address, "--config", str(config), "--run-dir", str(run_dir),
        f"model.cache_dir={model_cache}", "run.progress=false", "control.enabled=false",
        "checkpoint.final=false",
        timeout=600,
    )  # fmt: skip
    print(f"submit + 2 steps: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    job_id = proc.stdout.splitlines()[0].strip()
    assert "SUCCEEDED" in proc.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    assert all(m["rollouts"] == 2 * 16 for m in read_metrics(run_dir))

    info = httpx.get(f"{address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {ray_token}"})
    assert info.status_code == 200 and job_id in info.text and planted not in info.text

    status = _duet(env, "status", "--job", job_id, "--address", address)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stderr
    logs = _duet(env, "logs", job_id, "--address", address)
    assert logs.returncode == 0 and "run written to" in logs.stdout

    # Authentication stays on: no token, 401; a wrong one, refused too; and the CLI without it fails.
    assert httpx.get(f"{address}/api/jobs/").status_code == 401
    assert httpx.get(f"{address}/api/jobs/", headers={"Authorization": "Bearer nope"}).status_code in (
        401,
        403,
    )
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    refused = _duet(no_token, "status", "--job", job_id, "--address", address)
    assert refused.returncode == 1 and "Authentication" in refused.stderr

    # stop: a second submission, stopped before it gets anywhere.
    second = _duet(
        env, "submit", "--no-wait", "--address", address, "--run-dir", str(tmp_path / "run2"),
        f"model.cache_dir={model_cache}", "control.enabled=false",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    job2 = second.stdout.splitlines()[0].strip()
    stopped = _duet(env, "stop", job2, "--address", address)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 120
    while "STOPPED" not in (out := _duet(env, "status", "--job", job2, "--address", address).stdout):
        assert time.monotonic() < deadline, out
        time.sleep(2)


@pytest.mark.integration
def test_a_job_whose_python_lacks_duet_fails_at_once_and_says_how_to_fix_it(bare_ray_head, tmp_path):
    address, _, head_env = bare_ray_head
    # The submitter runs in the environment (duet is installed here); only the head's PATH lacks it.
    env = dict(head_env, PATH=os.environ["PATH"])
    proc = _duet(env, "submit", "--address", address, "--run-dir", str(tmp_path / "run"), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job_id = proc.stdout.splitlines()[0].strip()
    assert "duet submit --python" in proc.stdout, proc.stdout  # `duet submit` itself shows the message
    logs = _duet(env, "logs", job_id, "--address", address).stdout
    found = shutil.which("python", path=head_env["PATH"])
    if found is None:  # no `python` at all on that PATH
        assert "found no Python named 'python' on its PATH" in logs, logs
    else:
        said = re.search(
            r"this job runs the Python 'python' = (/\S+) \(3\.[\d.]+\), which does not have (.+)\.", logs
        )
        assert said is not None, logs
        assert Path(said[1]).is_file() and ("duet-rl" in said[2] or "ray" in said[2]), said[0]
    assert "start the Ray head from the environment where duet-rl is installed" in logs
    assert "duet submit --python /path/to/.venv/bin/python" in logs
    assert "Traceback" not in logs and "ModuleNotFoundError" not in logs
    status = _duet(env, "status", "--job", job_id, "--address", address)
    assert "FAILED" in status.stdout, status.stdout + status.stderr

    from ray.job_submission import JobSubmissionClient

    auth = {"Authorization": f"Bearer {head_env['RAY_AUTH_TOKEN']}"}
    info = JobSubmissionClient(address, headers=auth).get_job_info(job_id)
    ran_s = (info.end_time - info.start_time) / 1000  # from the job's start, upload included
    print(f"the failing job ran {ran_s:.2f} s")
    assert ran_s < 10

    # Naming the interpreter: the job passes the check and runs duet's own `train`, which (quickly,
    # on purpose) stops at a dataset that is not there; the full run is test_submit_trains_...'s.
    named = _duet(
        env, "submit", "--address", address, "--python", sys.executable, "--run-dir", str(tmp_path / "run2"),
        "data.path=/nonexistent/duet-check.jsonl", timeout=300,
    )  # fmt: skip
    logs = _duet(env, "logs", named.stdout.splitlines()[0].strip(), "--address", address).stdout
    assert "this job runs the Python" not in logs, logs
    assert "duet train: data.path: /nonexistent/duet-check.jsonl does not exist" in logs, logs


@pytest.mark.integration  # runs the entrypoint in a shell
def test_entrypoint_checks_its_python_first(tmp_path):
    """The entrypoint's own check, without a cluster: an interpreter that lacks duet's packages, and a
    PATH with no `python` at all."""
    from cluster.jobs import PYTHON_CHECK_ENV, entrypoint

    check = {PYTHON_CHECK_ENV: runtime_env(upload=False, extra_env={})["env_vars"][PYTHON_CHECK_ENV]}

    bare = tmp_path / "bin"
    bare.mkdir()
    python = bare / "python"  # this interpreter with its site-packages and PYTHONPATH switched off
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    python.chmod(0o755)
    command = entrypoint("python", ["train", "train.steps=1"])
    t0 = time.monotonic()
    r = subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=tmp_path,
        env={"PATH": f"{bare}:/usr/bin:/bin", **check},
        capture_output=True,
        text=True,
    )
    assert time.monotonic() - t0 < 5
    assert r.returncode == 1 and r.stdout == "", r
    assert f"this job runs the Python 'python' = {sys.executable}" in r.stderr
    assert "which does not have ray, duet-rl, torch, vllm, deepspeed." in r.stderr
    assert "duet submit --python /path/to/.venv/bin/python" in r.stderr

    r = subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=tmp_path,
        env={"PATH": str(tmp_path / "none")},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 127 and "found no Python named 'python' on its PATH" in r.stderr, r

    # The interpreter with everything: the check passes and duet's own `train` runs (and here stops at
    # a dataset that is not there, which is duet's message, not the check's).
    command = entrypoint(sys.executable, ["train", "data.path=/nonexistent/x.jsonl"])
    r = subprocess.run(
        ["/bin/sh", "-c", command], cwd=REPO, env={**os.environ, **check}, capture_output=True, text=True
    )
    assert r.returncode == 2 and "duet train: data.path: /nonexistent/x.jsonl does not exist" in r.stderr, r


def test_train_args_carry_an_outside_config_as_a_file_not_inlined(tmp_path):
    planted = secrets.token_hex(16)
    tree = {
        "preset": "dr-grpo",
        "rollout": {"group_size": 4, "temperature": 0.7},
        "control": {"token": planted},
    }
    outside = tmp_path / "c.yaml"
    outside.write_text(yaml.safe_dump(tree))
    args = train_args(str(outside), None, "/runs/x", ["train.steps=3"], upload=True)
    assert planted not in " ".join(args)  # the job's entrypoint shows on the dashboard
    assert args == ["train", "--config", jobs.JOB_CONFIG, "--run-dir", "/runs/x", "train.steps=3"]
    code = jobs.stage_code(outside, tmp_path / "staging")
    assert (code / jobs.JOB_CONFIG).read_text() == outside.read_text()
    assert (code / "cluster" / "driver.py").is_file() and not (code / ".venv").exists()
    assert load_config(str(code / jobs.JOB_CONFIG), ["train.steps=3"]) == load_config(
        str(outside), ["train.steps=3"]
    )
    renv = runtime_env(upload=True, extra_env={}, working_dir=code)
    assert renv["working_dir"] == str(code) and planted not in repr(renv)
    assert jobs.JOB_CONFIG in " ".join(train_args(str(outside), "2-grpo", None, [], upload=True))

    inside = REPO_ROOT / "configs" / "2grpo_qwen2.5-math-1.5b.yaml"
    assert train_args(str(inside), None, None, [], upload=True) == [
        "train", "--config", "configs/2grpo_qwen2.5-math-1.5b.yaml",
    ]  # fmt: skip
    assert train_args("configs/x.yaml", None, None, [], upload=False) == [
        "train",
        "--config",
        "configs/x.yaml",
    ]

    renv = runtime_env(upload=True, extra_env={"A": "1"})
    assert renv["working_dir"] == str(REPO_ROOT) and ".venv" in renv["excludes"]
    assert renv["env_vars"]["A"] == "1" and renv["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "working_dir" not in runtime_env(upload=False, extra_env={})


def test_submit_resume_takes_the_runs_own_config_and_an_absolute_folder(tmp_path, capsys):
    """`duet submit --resume RUN_DIR` (the resume after a lost node, tests/test_cluster_sim.py): the job
    runs `train --resume RUN_DIR`; a config, preset or --run-dir beside it, or a relative RUN_DIR (read in
    the job's copy of the code), is refused before anything is sent."""
    from cluster.jobs import resume_args, submit_main

    assert resume_args("/shared/run", ["train.steps=9"]) == [
        "train",
        "--resume",
        "/shared/run",
        "train.steps=9",
    ]
    assert submit_main(["--resume", "/shared/run", "--config", "x.yaml"]) == 2
    assert "add overrides only" in capsys.readouterr().err
    assert submit_main(["--resume", "runs/x"]) == 2
    assert "absolute path" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  steps: 3\n")
    assert submit_main(["--resume", str(run), "train.stepz=4"]) == 2  # checked here, not in the job
    assert "stepz" in capsys.readouterr().err


def test_a_run_stopped_inside_a_ray_job_names_duet_submit_resume(monkeypatch):
    from cluster.cli import _job_resume_hint

    stopped = "a learner rank died at step 3 (...). Continue with: duet train --resume /shared/run"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _job_resume_hint(stopped, "/shared/run") == ""  # `duet train` on a machine: as it was
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the job
    assert "duet submit --address http://HEAD:8265 --resume /shared/run" in _job_resume_hint(
        stopped, "/shared/run"
    )
    assert _job_resume_hint("preflight: no GPU on any node", "/shared/run") == ""  # nothing to resume

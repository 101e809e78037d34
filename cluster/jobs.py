"""Run training on a Ray cluster through the Ray Jobs API: `duet submit`, `duet logs`, `duet stop`,
`duet status --job`.

The job's entrypoint is `python -m cluster.cli train ...` run by the `python` on the job's PATH on the
head node (or the interpreter `--python` names), so the cluster needs duet-rl's dependencies (vLLM,
DeepSpeed, ...). A head started as `.venv/bin/ray start` without activating the environment has some
other `python` on its PATH: the entrypoint first checks, with the standard library only, that its
interpreter can import ray and duet-rl's parts, and otherwise fails at once with a message naming that
interpreter, what it lacks and the two fixes. The code itself travels
with the job by default: the repository root holding the packages is uploaded as the runtime env's
`working_dir` (without .venv, runs, .git, caches). With `--no-upload` nothing is uploaded and the job
runs where the head's `ray start` ran, against the duet-rl installed there (the docker images).
The vLLM plugin entry point (the gloo weight-transfer engine) exists only where duet-rl is installed
(`pip install`), so CPU clusters need the package installed either way; the upload then only makes
the job run the submitter's version of the code.

Ray 2.60 protects the dashboard and the Jobs API with a token (401 without it). The commands send it
as `Authorization: Bearer`, read from RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token: the same places Ray itself looks. Nothing here turns authentication off.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cluster.config import PRESETS, ConfigError, load_config, refuse_secret_overrides

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
REPO_ROOT = Path(__file__).resolve().parents[1]  # the folder holding cluster/, actors/, learner/, rewards/
UPLOAD_EXCLUDES = [
    ".venv",
    "venv",
    "runs",
    ".git",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "benchmarks/results",
]
# Submitter variables carried into the job: vLLM knobs, offline switches and duet's own. Secrets (any
# *TOKEN*) are not: they would sit in the job's record on the head; pass one with --env on purpose.
FORWARD_ENV_PREFIXES = ("VLLM_", "DUET_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def ray_auth_token() -> str | None:
    """Ray's token, looked up where Ray looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
            if token:
                return token
    return None


def job_client(address: str | None = None):
    """A JobSubmissionClient that sends the Ray token (when there is one) on every request.

    Ray's own client adds the header only when this process runs with RAY_AUTH_MODE=token; passing
    it explicitly works from any shell and leaves the cluster's authentication as it is.
    """
    from ray.job_submission import JobSubmissionClient

    token = ray_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address or default_address(), headers=headers)


def default_address() -> str:
    addr = os.environ.get("RAY_ADDRESS", "").strip()
    # RAY_ADDRESS may name the GCS (host:6379) for ray.init; the Jobs API needs the dashboard URL.
    return addr if addr.startswith(("http://", "https://")) else DEFAULT_ADDRESS


# An outside config travels inside the job's uploaded code under this name (see train_args).
JOB_CONFIG = ".duet-job-config.yaml"


def train_args(
    config: str | None, preset: str | None, run_dir: str | None, overrides: list[str], upload: bool
) -> list[str]:
    """The `train` arguments the job runs with.

    A config file inside the uploaded code is passed by its relative path. Any other would not exist on
    the cluster: it travels as a file in the job's uploaded code (`stage_code` puts it there as
    JOB_CONFIG), never inlined into the entrypoint, which the dashboard shows to anyone who can see the
    job. Without upload the path is passed as given: it must exist on the head (relative to the directory
    its `ray start` ran in).
    """
    args: list[str] = []
    if config is not None:
        path = Path(config).expanduser().resolve()
        if not upload:
            args += ["--config", config]
        else:
            rel = _inside_upload(path)
            args += ["--config", rel.as_posix() if rel is not None else JOB_CONFIG]
    if preset is not None:
        args += ["--preset", preset]
    if run_dir is not None:
        args += ["--run-dir", run_dir]
    return ["train", *args, *overrides]


def resume_args(run_dir: str, overrides: list[str]) -> list[str]:
    """The `train` arguments of a job that continues `run_dir` (on the cluster's shared storage) from its
    last complete checkpoint: the run's own config.yaml there, plus overrides."""
    return ["train", "--resume", run_dir, *overrides]


def _inside_upload(path: Path) -> Path | None:
    """`path` relative to the uploaded code, or None when it is not uploaded (outside, or excluded)."""
    if not path.is_relative_to(REPO_ROOT):
        return None
    rel = path.relative_to(REPO_ROOT)
    excluded = any(
        fnmatch.fnmatch(part, pattern.removeprefix("**/"))
        for part in rel.parts
        for pattern in UPLOAD_EXCLUDES
    ) or any(rel.as_posix().startswith(pattern + "/") for pattern in UPLOAD_EXCLUDES)
    return None if excluded else rel


def stage_code(config: Path, into: Path) -> Path:
    """A copy of the code to upload (UPLOAD_EXCLUDES left out) with `config` added as JOB_CONFIG; returns
    the folder to give as the job's working_dir."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(REPO_ROOT)
        return {
            name
            for name in names
            if any(fnmatch.fnmatch(name, pattern.removeprefix("**/")) for pattern in UPLOAD_EXCLUDES)
            or (rel / name).as_posix() in UPLOAD_EXCLUDES
        }

    code = into / "code"
    shutil.copytree(REPO_ROOT, code, ignore=ignore, symlinks=True)
    shutil.copyfile(config, code / JOB_CONFIG)
    return code


def runtime_env(upload: bool, extra_env: dict[str, str], working_dir: Path = REPO_ROOT) -> dict:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES) and "TOKEN" not in k}
    env["PYTHONUNBUFFERED"] = "1"  # progress lines reach `duet logs` as they are printed
    env[PYTHON_CHECK_ENV] = _PYTHON_CHECK  # run by the entrypoint's first command
    env.update(extra_env)
    renv: dict = {"env_vars": env}
    if upload:
        renv["working_dir"] = str(working_dir)
        renv["excludes"] = UPLOAD_EXCLUDES
    return renv


# Run by the job's interpreter before the training command; standard library only, so it works in
# exactly the environment that lacks duet-rl. argv[1]: how the interpreter was named.
_PYTHON_CHECK = """\
import importlib.util, sys
need = {"ray": "ray", "cluster.cli": "duet-rl", "torch": "torch", "vllm": "vllm", "deepspeed": "deepspeed"}
missing = []
for module, package in need.items():
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception:
        found = False
    if not found:
        missing.append(package)
if missing:
    sys.exit(
        "duet: this job runs the Python " + repr(sys.argv[1]) + " = " + sys.executable
        + " (" + sys.version.split()[0] + "), which does not have " + ", ".join(missing) + ".\\n"
        "Fix: start the Ray head from the environment where duet-rl is installed "
        "(source .venv/bin/activate, then ray start --head ...), or name that environment's "
        "interpreter: duet submit --python /path/to/.venv/bin/python ..."
    )
"""


PYTHON_CHECK_ENV = "DUET_PYTHON_CHECK"


def entrypoint(python: str, argv_train: list[str]) -> str:
    """The job's shell command: find `python`, check it has what the run needs, then train with it."""
    py = shlex.quote(python)
    no_python = shlex.quote(
        f"duet: the job found no Python named {python!r} on its PATH. Fix: start the Ray head from the "
        "environment where duet-rl is installed, or name its interpreter: duet submit --python "
        "/path/to/.venv/bin/python ..."
    )
    # The check's code travels in the runtime env (PYTHON_CHECK_ENV), so the job's log, which starts
    # with the entrypoint, shows one readable line.
    return (
        f"command -v {py} >/dev/null 2>&1 || {{ echo {no_python} >&2; exit 127; }}; "
        f'{py} -c "${PYTHON_CHECK_ENV}" {py} && ' + shlex.join([python, "-m", "cluster.cli", *argv_train])
    )


async def _tail(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED. Ctrl-C detaches, the job runs on."""
    try:
        asyncio.run(_tail(client, job_id))
    except KeyboardInterrupt:
        print(f"\ndetached; the job runs on. `duet stop {job_id}` stops it.", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    deadline = time.monotonic() + 30  # the log stream can close a moment before the state is final
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status}" + (f" ({info.message})" if info.message else ""), file=sys.stderr)
    return 0 if str(info.status) == "SUCCEEDED" else 1


def _address_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--address", default=None, help=f"Ray dashboard URL (default: RAY_ADDRESS or {DEFAULT_ADDRESS})"
    )


def _run(fn) -> int:
    """Errors from the cluster (unreachable, 401, unknown job) as one line, not a traceback."""
    try:
        return fn()
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        print(f"duet: {e}", file=sys.stderr)
        return 1


def submit_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="duet submit", description="Submit a training run as a Ray job.")
    _address_arg(ap)
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="named algorithm preset")
    ap.add_argument("--run-dir", help="output folder on the cluster; use an absolute path on shared storage")
    ap.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (absolute, on the cluster's shared storage) from its last "
        "complete checkpoint, with its own config; add overrides only",
    )
    ap.add_argument("--no-wait", action="store_true", help="print the job id and return")
    ap.add_argument(
        "--no-upload", action="store_true", help="do not upload the code: the cluster has duet-rl installed"
    )
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job env var (repeat)")
    ap.add_argument("--job-id", help="submission id (default: Ray picks one)")
    ap.add_argument(
        "--python",
        default="python",
        help="the interpreter that runs the job on the head, with duet-rl installed (default: the "
        "`python` on the PATH the head was started with), e.g. /opt/duet/.venv/bin/python",
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    args = ap.parse_args(argv)
    upload = not args.no_upload
    if args.resume is not None:
        if args.config or args.preset or args.run_dir:
            print(
                "duet submit: --resume takes the run's own config (RUN_DIR/config.yaml) and folder; "
                "add overrides only",
                file=sys.stderr,
            )
            return 2
        if not Path(args.resume).is_absolute():
            print(
                f"duet submit: --resume {args.resume}: give the run's absolute path on the cluster's shared "
                "storage (a relative one would be read in the job's copy of the code)",
                file=sys.stderr,
            )
            return 2
    try:
        refuse_secret_overrides(args.overrides)
        if args.resume is not None:
            own = Path(args.resume) / "config.yaml"
            if own.exists():  # the shared storage is mounted here too: check now, not minutes into the job
                load_config(str(own), args.overrides)
            argv_train = resume_args(args.resume, args.overrides)
        elif args.config is None or Path(args.config).expanduser().exists():
            load_config(args.config, args.overrides, args.preset)  # fail here, not minutes into the job
        elif upload:  # without upload the path is the cluster's: it need not exist here
            raise ConfigError(f"{args.config}: no such file")
        if args.resume is None:
            argv_train = train_args(args.config, args.preset, args.run_dir, args.overrides, upload)
        extra_env = dict(item.split("=", 1) for item in args.env)
    except (ConfigError, ValueError, OSError) as e:
        print(f"duet submit: {e}", file=sys.stderr)
        return 2
    if upload and args.resume is None and (args.run_dir is None or not Path(args.run_dir).is_absolute()):
        print(
            "duet submit: warning: a relative run dir lands in the job's copy of the code on the head; "
            "pass an absolute --run-dir to keep the outputs",
            file=sys.stderr,
        )
    command = entrypoint(args.python, argv_train)

    outside = upload and args.config is not None and JOB_CONFIG in argv_train

    def go() -> int:
        client = job_client(args.address)
        with tempfile.TemporaryDirectory(prefix="duet-submit-") as staging:
            # submit_job uploads the working_dir before it returns: the staged copy can go afterwards.
            code = stage_code(Path(args.config).expanduser(), Path(staging)) if outside else REPO_ROOT
            job_id = client.submit_job(
                entrypoint=command,
                runtime_env=runtime_env(upload, extra_env, code),
                submission_id=args.job_id,
            )
        print(job_id, flush=True)
        return 0 if args.no_wait else follow(client, job_id)

    return _run(go)


def logs_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="duet logs", description="Print a Ray job's logs.")
    ap.add_argument("job_id")
    _address_arg(ap)
    ap.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    args = ap.parse_args(argv)

    def go() -> int:
        client = job_client(args.address)
        if args.follow:
            return follow(client, args.job_id)
        print(client.get_job_logs(args.job_id), end="")
        return 0

    return _run(go)


def stop_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="duet stop", description="Stop a Ray job.")
    ap.add_argument("job_id")
    _address_arg(ap)
    args = ap.parse_args(argv)

    def go() -> int:
        stopped = job_client(args.address).stop_job(args.job_id)
        print(f"job {args.job_id}: " + ("stop requested" if stopped else "not running"))
        return 0

    return _run(go)


def job_status_main(argv: list[str]) -> int:
    """`duet status --job JOB_ID`: the job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    ap = argparse.ArgumentParser(prog="duet status --job", description="A Ray job's status.")
    ap.add_argument("--job", required=True, metavar="JOB_ID")
    _address_arg(ap)
    args = ap.parse_args(argv)

    def go() -> int:
        info = job_client(args.address).get_job_info(args.job)
        print(f"{args.job}: {info.status}" + (f" ({info.message})" if info.message else ""))
        return 0

    return _run(go)

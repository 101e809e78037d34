"""What a run needs around the loop: Ray (started without the driver's secrets), the model folder, the run
directory and the files in it.

    RUN_DIR/config.yaml     the resolved config (secrets left out); `duet train --resume` reads it back
    RUN_DIR/actors.json     the live processes (driver, engines, learner ranks, reward workers)
    RUN_DIR/timeline.jsonl  who was busy when (engines, rewards, learner, broadcast), appended at the end
    RUN_DIR/metrics.jsonl   one row per step (cluster/metrics.py); checkpoints/ (cluster/checkpoints.py)

Ray is imported only by the functions that need it: the CLI checks a config without starting Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster import dashboard
from cluster.config import Config, ConfigError
from cluster.placement import Plan, ray_cpus_needed

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. a learner rank died); the message says from where to resume."""


def start_ray(cfg: Config, run_dir: Path) -> None:
    """Ray for this run (see init_ray), started without the driver's secrets in its environment; a Ray
    this process started is announced (its dashboard's URL), one set up before (tests, benchmarks) is not."""
    import ray

    connects_here = not ray.is_initialized()
    with without_secrets(cfg):  # Ray's workers inherit the driver's environment: not our tokens
        init_ray(cfg)
    if connects_here:
        dashboard.announce(run_dir, cfg.run, local=not os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def without_secrets(cfg: Config) -> Iterator[None]:
    """The driver's environment without the variables that hold its secrets (the control token's, the
    remote reward server's), while Ray starts: Ray's processes, and every worker they start, inherit
    the environment of the process that started them. The driver keeps them (it reads them)."""
    names = {cfg.control.token_env, getattr(cfg.rewards, "remote_token_env", "DUET_REWARD_TOKEN")}
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def init_ray(cfg: Config) -> None:
    """Join the Ray of `ray job submit` (or RAY_ADDRESS), else start a local one with enough CPUs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`, or pointed at a cluster
        ray.init(log_to_driver=False)
        return
    ray.init(
        # "local": a Ray of this run's own, even when `ray start` left a cluster on this machine (plain
        # ray.init() would join that one, and refuse num_cpus there).
        address="local",
        num_cpus=max(os.cpu_count() or 1, ray_cpus_needed(cfg)),
        log_to_driver=False,
        **dashboard.ray_init_options(cfg.run),  # Ray's dashboard on 127.0.0.1, behind Ray's token
    )


def engines_the_cluster_holds(plan: Plan, at_least: int) -> int:
    """The default of rollout.max_engines: how many engine bundles the cluster's resources hold beside the
    learner's bundles (a typo in `duet scale` must not wait forever for resources that do not exist)."""
    import ray

    free = dict(ray.cluster_resources())
    for bundle in plan.learner_bundles:
        for key, amount in bundle.items():
            free[key] = free.get(key, 0.0) - amount
    engine = plan.engine_bundles[0]
    fits = min(int(free.get(key, 0.0) // amount) for key, amount in engine.items() if amount > 0)
    return max(at_least, fits)


def check_model(cfg: Config) -> None:
    """Fail before any actor starts when model.path is neither a Hugging Face folder nor a hub id."""
    path = cfg.model.path
    if path is None:
        return
    folder = Path(path).expanduser()
    if not folder.is_dir() and not _HUB_ID.match(path):
        raise ConfigError(f"model.path: {path!r} is not a folder (nor a Hugging Face hub id)")
    if folder.is_dir() and not (folder / "config.json").exists():
        raise ConfigError(
            f"model.path: {path!r} has no config.json: not a Hugging Face model folder (for a `duet train` "
            "run, use RUN_DIR/checkpoints/step_XXXXXX/hf)"
        )


def resolve_model(cfg: Config) -> str:
    """The model folder: the user's, or the embedded tiny model (built and warm-started once): with an
    environment, the one warm-started on the tool-call format (envs/task.py)."""
    if cfg.model.path is not None:
        return cfg.model.path
    if cfg.env.enabled:
        from envs.task import ensure_tool_model

        return str(ensure_tool_model(cfg.model.cache_dir))
    from learner.tiny_model import ensure_tiny_model

    return str(
        ensure_tiny_model(
            cfg.model.cache_dir, cfg.model.warm_start_steps, cfg.data.synthetic_max_operand, seed=0
        )
    )


def resolve_lora_targets(cfg: Config, model_path: str) -> None:
    """LoRA runs: learner.lora.target_modules checked against the model (or its default read from it) before
    anything starts; ConfigError names the field."""
    lora = cfg.learner.lora
    if not lora.enabled:
        return
    from learner.lora import targets_of

    try:
        lora.target_modules = targets_of(model_path, lora.rank, lora.target_modules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    architecture = _engine_without_lora(model_path)
    if architecture is not None:
        raise ConfigError(
            f"learner.lora.rank={lora.rank}: vLLM's {architecture} does not serve LoRA adapters, so the "
            "engines could not serve what the learner trains; set learner.lora.rank=0 (full weights)"
        )


def _engine_without_lora(model_path: str) -> str | None:
    """The model's vLLM architecture when vLLM has it and it cannot serve adapters (it would refuse at engine
    start, "does not support LoRA yet"); None otherwise (an architecture vLLM lacks is vLLM's own error)."""
    architectures = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    for architecture in architectures:
        # vLLM has no public "does this architecture take LoRA" query; its engine asks supports_lora() of
        # the class the registry resolves, the same lookup as here.
        model_cls = ModelRegistry._try_load_model_cls(architecture)
        if model_cls is not None:
            return None if supports_lora(model_cls) else architecture
    return None


# What a run leaves in its folder: any of these means the folder holds a run already.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")


def run_dir_path(cfg: Config, run_dir: str | None) -> Path:
    """The run's folder: `run_dir`, else run.run_dir, else runs/<date-time>."""
    return Path(run_dir or cfg.run.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def check_run_dir(path: Path, resume: bool) -> None:
    """A run directory holds one run: a new run (no --resume) needs a folder without one, since its
    metrics would be appended to the old run's and checkpoint pruning would mix both runs' steps."""
    if resume:
        return
    found = [name for name in RUN_FILES if (path / name).exists()]
    if found:
        raise ConfigError(
            f"run directory {path} already holds a run ({', '.join(found)}): continue it with "
            f"`duet train --resume {path}`, or give a new --run-dir (or run.run_dir), or remove {path}"
        )


def new_run_dir(cfg: Config, run_dir: str | None, resume: bool = False) -> Path:
    """The run's folder (created), refused when it holds a run already and `resume` is not set."""
    path = run_dir_path(cfg, run_dir)
    check_run_dir(path, resume)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(run_dir: Path, cfg: Config) -> None:
    """RUN_DIR/config.yaml: the resolved config (derived defaults filled in), with secrets left out (the
    control token lives in control.json, mode 0600)."""
    import yaml

    tree = json.loads(cfg.model_dump_json())
    tree["control"]["token"] = None
    tree["rewards"]["remote_token"] = None
    tree["control"]["start_paused"] = False  # for this launch only: a resume runs unless asked again
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))


def write_actors(
    run_dir: Path, engines: list[dict], learner_pids: list[int], reward_pids: list[int | None], **where: Any
) -> None:
    """RUN_DIR/actors.json (engines as {"id", "pid", "address"}, pid None for an engine that did not
    answer; `where`: node addresses and the rendezvous), replaced atomically: operators and the fault
    tests read it mid-run."""
    info = {
        "driver": os.getpid(),
        "engines": engines,
        "learner": learner_pids,
        "reward_workers": reward_pids,
        **where,
    }
    tmp = run_dir / ".actors.json"
    tmp.write_text(json.dumps(info))
    tmp.replace(run_dir / "actors.json")


def write_timeline(run_dir: Path, events: list[dict]) -> None:
    """RUN_DIR/timeline.jsonl: one busy interval per line ({"component", "start", "end"}, wall-clock),
    appended: a resumed run adds its intervals after those of the runs before it."""
    with (run_dir / "timeline.jsonl").open("a") as f:
        f.writelines(json.dumps(e) + "\n" for e in sorted(events, key=lambda e: e["start"]))

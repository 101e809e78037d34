"""Experiment trackers (`run.loggers`): TensorBoard, Weights & Biases, MLflow.

Every tracker gets the same thing: each step's scalar metrics under their metrics.jsonl names
(`reward/mean`, `time/step_s`, ...) at the step number, the resolved config with secrets left out
(RUN_DIR/config.yaml, as the driver wrote it), and the run directory's name as the run's name.

W&B and MLflow are optional extras and take their settings where their users keep them: WANDB_MODE,
WANDB_API_KEY, WANDB_ENTITY, WANDB_DIR (default: the run directory); MLFLOW_TRACKING_URI (a server,
a database, or `file:PATH` with MLFLOW_ALLOW_FILE_STORE=true).

A tracker that cannot start raises TrackerStartError before any actor starts (a run whose tracking
the user asked for and would not get is stopped with the reason). One that fails later is the
MetricsWriter's to report once and drop: a tracker must never stop training.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> pyproject extra that installs it


class TrackerStartError(RuntimeError):
    """A logger named in `run.loggers` could not start; the message says which and why."""


def scalars(metrics: dict) -> dict[str, float]:
    """The step's metrics every tracker logs: finite numbers, keyed by their metrics.jsonl names."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "step"
        and not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
    }


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """`{"run": {"seed": 0}}` -> `{"run.seed": "0"}`: the dotted names `duet train` overrides use."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (
                yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            )
    return out


class Tracker:
    name = "tracker"

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict, run_name: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        self.writer.add_text("run", run_name, 0)
        self.writer.flush()

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict, run_name: str, project: str) -> None:
        import wandb

        self.run = wandb.init(
            project=project,
            name=run_name,
            config=config,
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            tags=["duet-rl"],
            reinit="create_new",  # several runs in one process (tests, benchmarks) stay apart
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_key(key: str, keys: set[str]) -> str:
    """`key`, or `key/total` when `key` also names a group of others (`rollouts` beside `rollouts/extension`):
    MLflow's file store keeps each metric as a file under metrics/, so one name cannot be a file and a folder
    at once. Every MLflow store gets the same names, so a run reads the same on a server and in `mlruns/`."""
    prefix = key + "/"
    return f"{key}/total" if any(k.startswith(prefix) for k in keys) else key


class MlflowTracker(Tracker):
    name = "mlflow"
    _BATCH = 100  # MLflow's limit of params per log_batch call

    def __init__(self, run_dir: Path, config: dict, run_name: str, project: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's default
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(project)
        )
        run = self.client.create_run(
            experiment_id, run_name=run_name, tags={"duet.run_dir": str(run_dir.resolve())}
        )
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]  # 6000: MLflow's value limit
        for i in range(0, len(params), self._BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + self._BATCH])
        self.client.log_dict(self.run_id, config, "config.yaml")
        self.seen: set[str] = set()

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.seen.update(values)
        metrics = [Metric(mlflow_key(k, self.seen), v, now_ms, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


def start_trackers(
    names: list[str], run_dir: Path, config: dict, project: str, purge_step: int | None = None
) -> list[Tracker]:
    """Start every tracker in `names`; on a failure close those already started and raise
    TrackerStartError naming the logger, the reason and (for a missing package) the extra to install."""
    started: list[Tracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                started.append(TensorBoardTracker(run_dir, config, run_dir.name, purge_step))
            elif name == "wandb":
                started.append(WandbTracker(run_dir, config, run_dir.name, project))
            elif name == "mlflow":
                started.append(MlflowTracker(run_dir, config, run_dir.name, project))
            else:
                raise ValueError(f"unknown logger {name!r}")
        except Exception as e:
            for tracker in started:
                try:
                    tracker.close()
                except Exception:
                    pass
            hint = ""
            if isinstance(e, ImportError) and name in EXTRAS:
                hint = f" (install it: pip install 'duet-rl[{EXTRAS[name]}]')"
            raise TrackerStartError(
                f"run.loggers: {name} did not start: {type(e).__name__}: {e}{hint}"
            ) from e
    return started


def read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config without secrets, as the driver wrote it (empty when there is none)."""
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}

"""`run.loggers`: TensorBoard, W&B (offline) and MLflow (local file store) get the same metric names,
the resolved config without secrets and the run directory's name; a logger that cannot start stops
the run before Ray or any actor starts; one that fails mid-run is reported once and dropped."""

from __future__ import annotations

import shutil
import time

import pytest
import yaml

from cluster.config import load_config
from cluster.metrics import MetricsWriter, read_metrics
from cluster.trackers import scalars
from tests.helpers import integration_fixture
from tests.trackers_readback import mlflow_run, tensorboard_scalars, wandb_offline_run

SECRET = "do-not-log-this-token"


def _step(step: int) -> dict:
    """A record shaped like the driver's: scalars, a bool, nested dicts, lists, events."""
    return {
        "step": step,
        "policy_version": step,
        "reward/mean": 0.25 * step,
        "train/loss": -0.5 / step,
        "time/step_s": 1.5 + step,
        "groups/with_signal": 3 * step,
        "sync/checksum_match": True,
        "sync/engine_versions": [step],
        "queue": {"depth": 0, "put": 8 * step},
        "events": [],
        "staleness/mean": None,
    }


@integration_fixture()  # W&B starts its wandb-core process
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline into RUN_DIR, MLflow into a local file store: nothing leaves the machine."""
    run_dir = tmp_path / "run-2026-test"
    run_dir.mkdir()
    cfg = load_config(None, [f"control.token={SECRET}", "run.loggers=[tensorboard,wandb,mlflow]"])
    from cluster.runtime import write_config  # the driver's writer of RUN_DIR/config.yaml

    write_config(run_dir, cfg)
    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants an opt-in for file stores
    return run_dir, cfg, store


def test_every_logger_gets_the_same_metrics_config_and_run_name(offline_trackers):
    run_dir, cfg, store = offline_trackers
    writer = MetricsWriter(run_dir, cfg.run.loggers, cfg.run.tracker_project)
    for step in (1, 2, 3):
        writer.write(_step(step))
    writer.close()

    expected = {key: {s: scalars(_step(s))[key] for s in (1, 2, 3)} for key in scalars(_step(1))}
    assert set(expected) == {
        "policy_version",
        "reward/mean",
        "train/loss",
        "time/step_s",
        "groups/with_signal",
    }
    tb = tensorboard_scalars(run_dir)
    wb = wandb_offline_run(run_dir)
    ml = mlflow_run(store, "duet-rl")
    assert set(tb) == set(wb["history"]) == set(ml["history"]) == set(expected)
    for key, by_step in expected.items():
        assert tb[key] == pytest.approx(by_step), key
        assert wb["history"][key] == pytest.approx(by_step), key
        assert ml["history"][key] == pytest.approx(by_step), key

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["control"]["token"] is None and config["run"]["loggers"] == [
        "tensorboard",
        "wandb",
        "mlflow",
    ]
    assert wb["config"] == config and ml["config"] == config
    assert (
        ml["params"]["rollout.group_size"] == "2"
        and ml["params"]["run.loggers"] == "[tensorboard, wandb, mlflow]"
    )
    for logged in (wb["config"], ml["config"], ml["params"]):
        assert SECRET not in yaml.safe_dump(logged)
    assert wb["name"] == ml["name"] == run_dir.name
    assert wb["project"] == "duet-rl" and ml["status"] == "FINISHED"
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]


def test_a_logger_failing_mid_run_is_reported_once_and_dropped(offline_trackers, tmp_path, capsys):
    run_dir, _, _ = offline_trackers
    writer = MetricsWriter(run_dir, ["tensorboard", "mlflow"])
    writer.write(_step(1))
    # The store disappears under the run (a full disk or a lost mount looks the same to MLflow).
    shutil.rmtree(tmp_path / "mlruns")
    (tmp_path / "mlruns").write_text("not a folder any more")
    for step in (2, 3, 4):
        writer.write(_step(step))
    writer.close()

    err = capsys.readouterr().err
    assert err.count("logger mlflow failed") == 1, err
    assert "logger mlflow failed at step 2" in err and "off for the rest of the run" in err
    assert set(writer.failed) == {"mlflow"}
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]  # the record goes on
    assert sorted(tensorboard_scalars(run_dir)["reward/mean"]) == [1, 2, 3, 4]  # and the other logger


def test_a_logger_that_cannot_start_stops_the_run_before_any_actor(
    tmp_path, model_cache, tiny_model, monkeypatch
):
    import ray

    from cluster.driver import train
    from cluster.runtime import RunStopped

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{blocker}/mlruns")  # cannot be created
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = load_config(None, [f"model.cache_dir={model_cache}", "run.loggers=[tensorboard,mlflow]"])
    run_dir = tmp_path / "run"
    assert not ray.is_initialized()
    t0 = time.monotonic()
    with pytest.raises(RunStopped, match=r"run\.loggers: mlflow did not start: .*a-file"):
        train(cfg, str(run_dir))
    assert time.monotonic() - t0 < 60
    assert not ray.is_initialized()  # no Ray, so no actor
    assert not (run_dir / "actors.json").exists() and not (run_dir / "metrics.jsonl").exists()


def test_mlflow_names_a_metric_that_heads_a_group_total():
    from cluster.trackers import mlflow_key

    keys = {"rollouts", "rollouts/extension", "rollouts/per_signal_group", "reward/mean", "groups/total"}
    assert mlflow_key("rollouts", keys) == "rollouts/total"  # a file and a folder cannot share a name
    assert mlflow_key("rollouts/extension", keys) == "rollouts/extension"
    assert mlflow_key("reward/mean", keys) == "reward/mean"
    assert mlflow_key("rollout", keys) == "rollout"  # a prefix of the text, not of the path

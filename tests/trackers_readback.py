"""Read back what the trackers wrote, from their own files: TensorBoard events, W&B's offline run
file, an MLflow file store. Shared by the tracker tests and the dashboard run test."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import yaml


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _wandb_records(path: Path) -> list:
    """W&B's transaction log: a 7-byte header, then LevelDB-style records in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunk, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def wandb_offline_run(wandb_dir: Path) -> dict:
    """{"name", "project", "config", "history": {key: {step: value}}} of the one offline run there."""
    files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out: dict = {"config": {}, "history": {}}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = record.run.display_name, record.run.project
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            step = int(items.pop("_step", record.history.step.num))
            for key, value in items.items():
                if not key.startswith("_"):
                    out["history"].setdefault(key, {})[step] = value
    out["config"].pop("_wandb", None)
    return out


def mlflow_run(tracking_uri: str, experiment: str) -> dict:
    """{"name", "params", "config", "history": {key: {step: value}}} of the experiment's one run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, runs
    run = runs[0]
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in run.data.metrics
    }
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
    return {
        "name": run.info.run_name,
        "status": run.info.status,
        "params": dict(run.data.params),
        "config": config,
        "history": history,
    }

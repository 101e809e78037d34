"""metrics.jsonl (one JSON object per step) and TensorBoard event files in the run directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cluster import faults


class MetricsWriter:
    """Appends one row per step to metrics.jsonl and its scalars to TensorBoard.

    `purge_step` (a resumed run: the first step it will redo): TensorBoard events of that step and later,
    written by the run that crashed, are superseded: the writer records a purge marker (TensorBoard's
    `file_version` event with `purge_step`) and TensorBoard hides every older event at or after it.
    metrics.jsonl itself is truncated by cluster.checkpoints.truncate_metrics before this opens it.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.file = (run_dir / "metrics.jsonl").open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except Exception:  # tensorboard missing: metrics.jsonl is still complete
                self.tb = None

    def write(self, metrics: dict) -> None:
        line = json.dumps(metrics, default=str) + "\n"
        if os.environ.get(faults.ENV) and faults.armed_at("metrics.mid_write", metrics["step"]):
            self.file.write(line[: len(line) // 2])  # a crash halfway through the row
            self.file.flush()
            os.fsync(self.file.fileno())
            faults.crash("metrics.mid_write", metrics["step"])
        self.file.write(line)
        self.file.flush()
        if self.tb is not None:
            step = metrics["step"]
            for key, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "step":
                    continue
                if math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

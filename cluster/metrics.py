"""metrics.jsonl (one JSON object per step) and TensorBoard event files in the run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.file = (run_dir / "metrics.jsonl").open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard missing: metrics.jsonl is still complete
                self.tb = None

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics, default=str) + "\n")
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

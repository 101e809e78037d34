"""metrics.jsonl (one JSON object per step, always) and the experiment trackers in `run.loggers`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cluster import faults
from cluster.trackers import Tracker, read_config, scalars, start_trackers


class MetricsWriter:
    """Writes each step to metrics.jsonl and to every tracker.

    Trackers start here, so a tracker that cannot start raises TrackerStartError before the driver
    starts an actor. A tracker that fails later is reported once on stderr and dropped: metrics.jsonl
    and the other trackers go on, and so does training.

    `purge_step` (a resumed run: the first step it will redo): TensorBoard events of that step and later,
    written by the run that crashed, are superseded (TensorBoard's purge marker hides them).
    metrics.jsonl is opened at the first write, after cluster.checkpoints.truncate_metrics has cut it
    back to the checkpoint's step (that rewrite replaces the file).
    """

    def __init__(
        self,
        run_dir: Path,
        loggers: Sequence[str] = ("tensorboard",),
        project: str = "duet-rl",
        purge_step: int | None = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[Tracker] = start_trackers(
            list(loggers), run_dir, read_config(run_dir), project, purge_step
        )
        self.failed: dict[str, str] = {}  # logger -> why it was dropped
        self.file = None

    def write(self, metrics: dict) -> None:
        if self.file is None:
            self.file = self.path.open("a")
        line = json.dumps(metrics, default=str) + "\n"
        if os.environ.get(faults.ENV) and faults.armed_at("metrics.mid_write", metrics["step"]):
            self.file.write(line[: len(line) // 2])  # a crash halfway through the row
            self.file.flush()
            os.fsync(self.file.fileno())
            faults.crash("metrics.mid_write", metrics["step"])
        self.file.write(line)
        self.file.flush()
        values, step = scalars(metrics), metrics["step"]
        for tracker in list(self.trackers):
            try:
                tracker.log(values, step)
            except Exception as e:
                self._drop(tracker, f"failed at step {step}: {type(e).__name__}: {e}")

    def _drop(self, tracker: Tracker, why: str) -> None:
        self.trackers.remove(tracker)
        self.failed[tracker.name] = why
        print(
            f"duet: logger {tracker.name} {why}; it is off for the rest of the run "
            "(metrics.jsonl and the other loggers go on)",
            file=sys.stderr,
            flush=True,
        )
        try:
            tracker.close()
        except Exception:
            pass

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                print(f"duet: logger {tracker.name} did not close cleanly: {e}", file=sys.stderr)
        self.trackers = []


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Where a step's metrics go, in this order: metrics.jsonl and the trackers (MetricsWriter), Ray's live
metrics (Telemetry), the control API's /status (RunControl.publish) and, with run.progress, one line on
stderr. The crash points `step.before_metrics` and `step.after_metrics` sit around the metrics row."""

from __future__ import annotations

import sys
from pathlib import Path

from cluster import faults
from cluster.config import Config
from cluster.control import RunControl
from cluster.fleet import RolloutFleet
from cluster.metrics import MetricsWriter
from cluster.runtime import RunStopped
from cluster.telemetry import Telemetry
from cluster.trackers import TrackerStartError


class StepReporter:
    """Built before any actor starts: the trackers start here, and a run without the tracking asked for
    does not start (RunStopped). `start` once the actors are up; `close` at the end."""

    def __init__(self, cfg: Config, run_dir: Path, control: RunControl, purge_step: int | None) -> None:
        self.cfg, self.run_dir, self.control = cfg, run_dir, control
        try:
            # purge_step (a resumed run): TensorBoard's events of the steps it redoes are superseded.
            self.writer = MetricsWriter(run_dir, cfg.run.loggers, cfg.run.tracker_project, purge_step)
        except TrackerStartError as e:
            raise RunStopped(str(e)) from e
        self.telemetry: Telemetry | None = None
        self.fleet: RolloutFleet | None = None

    def start(self, fleet: RolloutFleet) -> None:
        """Ray's metrics (Ray is up now); `fleet`: whose engines' policy versions each step reports."""
        self.fleet = fleet
        self.telemetry = Telemetry(self.run_dir.name, enabled=self.cfg.run.ray_metrics)

    def report(self, metrics: dict, version: int) -> None:
        """Record step `metrics["step"]` (trained up to policy `version`) everywhere."""
        step = metrics["step"]
        faults.point("step.before_metrics", step)
        self.writer.write(metrics)
        faults.point("step.after_metrics", step)
        engine_versions = dict(zip(self.fleet.ids, self.fleet.versions()))
        self.telemetry.record_step(metrics, engine_versions, metrics["queue"])
        self.control.publish(step, self.cfg.train.steps, version, engine_versions, metrics)
        if self.cfg.run.progress:
            print(progress_line(metrics, self.cfg.train.steps), file=sys.stderr, flush=True)

    def close(self) -> None:
        self.writer.close()


def progress_line(m: dict, steps: int) -> str:
    """One line per step. It shows what moves on every step: the gradient norm and the entropy. The loss
    is left out: with one update per batch the ratio is 1 and the clipped surrogate's value is exactly
    -mean(A) over the step's tokens, ~0 with group-normalised advantages, however much is learned (it is in
    metrics.jsonl). The clip fraction appears when it can be non-zero (several updates per batch), the KL
    to the reference when there is one (algorithm.kl_coef > 0)."""
    grad = m.get("train/grad_norm")
    parts = [
        f"step {m['step']:>3}/{steps}  v{m['policy_version']}  reward {m['reward/mean']:.3f}  "
        f"signal {m['groups/with_signal']}/{m['groups/total']}",
        f"|grad| {grad:.4f}" if grad is not None else "|grad| -",  # no update: every group tied
    ]
    if "train/entropy" in m:
        parts.append(f"entropy {m['train/entropy']:.3f}")
    if m.get("train/updates", 1) > 1 and "train/clip_frac/total" in m:
        parts.append(f"clip {100 * m['train/clip_frac/total']:.1f}%")
    if "train/kl" in m:
        parts.append(f"kl(ref) {m['train/kl']:.4f}")
    parts.append(
        f"gen {m['time/generate_s']:.1f}s  train {m['time/train_s']:.1f}s  bcast {m['time/broadcast_s']:.2f}s  "
        f"sync {_sync_word(m.get('sync/checksum_match'))}"
    )
    return "  ".join(parts)


def _sync_word(match: bool | None) -> str:
    """None: the step's weights were not compared (train.check_weights_every_steps, or no update)."""
    return "unchecked" if match is None else "ok" if match else "MISMATCH"

"""Checkpoints on disk: writing them whole or not at all, finding the newest, pruning, resuming.

    RUN_DIR/checkpoints/step_000040/deepspeed/   DeepSpeed's checkpoint (model, optimizer, learner state)
                                   /hf/          a Hugging Face export (final checkpoint only)
                                   /driver_state.json   step, policy version, prompt-stream position
    RUN_DIR/checkpoints/.tmp-step_000040/        the same while it is being written

A checkpoint is written under its temporary name and renamed when complete, so a crash never leaves one
that looks whole but is not; `driver_state.json` is its last file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

_TAG = "state"  # DeepSpeed's tag inside deepspeed/


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a half-written one is still under its `.tmp-` name)."""
    root = run_dir / "checkpoints"
    done = (
        sorted(p for p in root.glob("step_*") if (p / "driver_state.json").exists()) if root.exists() else []
    )
    return done[-1] if done else None


def save_checkpoint(
    run_dir: Path, step: int, state: dict, learner: Any, keep: int, export_from: str | None = None
) -> Path:
    """Write step `step`: the learner's DeepSpeed checkpoint with the driver's `state` in it, a Hugging
    Face export when `export_from` (the model folder whose tokenizer to copy) is given, and
    driver_state.json; then keep only the newest `keep` checkpoints."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    learner.save_checkpoint(str(tmp / "deepspeed"), _TAG, state)
    if export_from is not None:
        learner.export_hf(str(tmp / "hf"), export_from)
    (tmp / "driver_state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    kept = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(checkpoint: Path, learner: Any) -> dict:
    """Load the learner's state from `checkpoint`; returns the driver's state saved with it."""
    return learner.load_checkpoint(str(checkpoint / "deepspeed"), _TAG)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics of steps after the checkpoint we resume from: they will be recomputed."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))

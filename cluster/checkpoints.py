"""Checkpoints on disk: writing them whole or not at all, finding the newest, pruning, resuming.

    RUN_DIR/checkpoints/step_000040/deepspeed/   DeepSpeed's checkpoint (model, optimizer, learner state)
                                   /adapter/     LoRA runs: the adapter in PEFT's format
                                   /hf/          a Hugging Face export (final checkpoint only; LoRA runs:
                                                 the base model with the adapter merged in)
                                   /driver_state.json   step, policy version, prompt-stream position
    RUN_DIR/checkpoints/.tmp-step_000040/        the same while it is being written

A checkpoint is written under its temporary name, every file in it is fsynced, it is renamed when
complete and the parent folder is fsynced, so a crash (or a power loss) never leaves one that looks whole
but is not; `driver_state.json` is its last file. Checkpoints are ordered by their step number.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from cluster import faults
from cluster.config import Config, ConfigError

_TAG = "state"  # DeepSpeed's tag inside deepspeed/
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder named step_N (None for anything else, e.g. `.tmp-step_N`)."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest step first (by number: step_1000000 sorts after step_999999)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    found = [
        p for p in root.iterdir() if checkpoint_step(p) is not None and (p / "driver_state.json").exists()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a half-written one is still under its `.tmp-` name)."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (and `folder` itself) to stable storage."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (POSIX: fsync the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, step: int, state: dict, learner: Any, keep: int, export_from: str | None = None
) -> Path:
    """Write step `step`: the learner's DeepSpeed checkpoint with the driver's `state` in it, a Hugging
    Face export when `export_from` (the model folder whose tokenizer to copy) is given, and
    driver_state.json; then keep only the newest `keep` checkpoints (by step number)."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    faults.point("checkpoint.before_write", step)
    learner.save_checkpoint(str(tmp / "deepspeed"), _TAG, state)
    faults.point("checkpoint.during_write", step)  # DeepSpeed's files written, driver_state.json not yet
    if (state.get("learner") or {}).get("lora_rank"):
        learner.export_adapter(str(tmp / "adapter"))  # a few MB: every checkpoint can be served as it is
    if export_from is not None:
        learner.export_hf(str(tmp / "hf"), export_from)
    (tmp / "driver_state.json").write_text(json.dumps(state))
    fsync_tree(tmp)  # the contents are durable before the name says "complete"
    faults.point("checkpoint.before_rename", step)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(root)  # and the rename itself
    faults.point("checkpoint.after_rename", step)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(checkpoint: Path, learner: Any) -> dict:
    """Load the learner's state from `checkpoint`; returns the driver's state saved with it."""
    return learner.load_checkpoint(str(checkpoint / "deepspeed"), _TAG)


def check_resumable(checkpoint: Path, cfg: Config) -> None:
    """Refuses, before any actor starts, a resume at another ZeRO stage than `checkpoint` was written at:
    each stage lays out DeepSpeed's optimizer state its own way (one file at 0, a partition per rank at 1-2,
    parameters partitioned too at 3), and DeepSpeed's load_checkpoint does not convert between them.
    Checkpoints written before the stage was recorded are not checked."""
    state = json.loads((checkpoint / "driver_state.json").read_text())
    learner = state.get("learner") or {}
    lora = cfg.learner.lora
    if learner.get("lora_rank", 0) != lora.rank or (
        lora.enabled and sorted(learner.get("lora_targets") or []) != sorted(lora.target_modules or [])
    ):
        raise ConfigError(
            f"{checkpoint} was written with learner.lora.rank={learner.get('lora_rank', 0)} "
            f"(target modules {learner.get('lora_targets')}) and this launch asks for learner.lora.rank="
            f"{lora.rank} (target modules {lora.target_modules}): a checkpoint holds the trained parameters "
            "of its own setting (the adapter, or the full weights) and no other. Resume with the setting it "
            "was written with (drop the override; RUN_DIR/config.yaml holds it)"
        )
    written = learner.get("zero_stage")
    asked = cfg.learner.zero_stage
    if written is not None and written != asked:
        raise ConfigError(
            f"{checkpoint} was written at learner.zero_stage={written} and this launch asks for "
            f"learner.zero_stage={asked}: DeepSpeed keeps optimizer state in a different layout at each stage "
            f"and cannot load one stage's checkpoint at another. Resume with learner.zero_stage={written} "
            "(drop the override; RUN_DIR/config.yaml holds it)"
        )


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the metrics of steps up to `step` (the checkpoint we resume from): later ones will be
    recomputed. A last line cut short by a crash is dropped. The file is replaced atomically (written
    aside, fsynced, renamed), so a crash here leaves either the old file or the new one."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # cut short by a crash mid-write (only ever the last line)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + b"\n")
    tmp = path.with_name(".metrics.jsonl.tmp")
    with tmp.open("wb") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(run_dir)


class RunCheckpoints:
    """A run's checkpoints as the driver takes them: the learner's state with the driver's beside it (step,
    policy version, prompt-stream position, watchdog counts), and resuming from one. `actors` is the run's
    RunActors: its learner, and `learner_call`, through which a dead learner rank stops the run with a
    resume hint."""

    def __init__(self, run_dir: Path, cfg: Config, model_path: str, actors: Any) -> None:
        self.run_dir, self.cfg, self.model_path, self.actors = run_dir, cfg, model_path, actors

    def save(self, step: int, version: int, prompts: Any, watchdog: Any, export: bool = False) -> Path:
        """A checkpoint of `step` (with a Hugging Face export when `export`); see save_checkpoint."""
        state = {
            "step": step,
            "policy_version": version,
            "prompts": prompts.state(),
            "watchdog": watchdog.state(),
            # Sampling RNG is reseeded per step from (run.seed, step), so the step number restores it.
            "rng": {"scheme": "engines reseeded from run.seed and the step", "seed": self.cfg.run.seed},
            "learner": {
                "zero_stage": self.cfg.learner.zero_stage,
                "num_ranks": self.cfg.learner.num_ranks,
                "lora_rank": self.cfg.learner.lora.rank,
                "lora_targets": self.cfg.learner.lora.target_modules,
            },
        }
        export_from = self.model_path if export else None
        learner, keep = self.actors.learner, self.cfg.checkpoint.keep
        return self.actors.learner_call(
            save_checkpoint, self.run_dir, step, state, learner, keep, export_from
        )

    def of_step(self, step: int) -> Path | None:
        """The complete checkpoint of `step`, if one was written."""
        done = self.run_dir / "checkpoints" / f"step_{step:06d}"
        return done if (done / "driver_state.json").exists() else None

    def load(self, checkpoint: Path, prompts: Any, watchdog: Any) -> tuple[int, int]:
        """The learner's state from `checkpoint`; the prompt stream and the watchdog are restored to theirs.
        Returns (step, policy version)."""
        state = self.actors.learner_call(load_checkpoint, checkpoint, self.actors.learner)
        prompts.load_state(state["prompts"])
        watchdog.load_state(state.get("watchdog"))
        return state["step"], state["policy_version"]

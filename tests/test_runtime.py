"""The parts around the driver's loop, without actors: derived config defaults and config.yaml, the
model check, checkpoint files, and the control requests the loop applies between steps."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from cluster.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_metrics
from cluster.config import PRESETS, ConfigError, SamplingConfig, load_config
from cluster.control import RunControl
from cluster.runtime import check_model, write_config


def test_derived_defaults_are_filled_once_and_read_back_on_resume(tmp_path):
    cfg = load_config(
        overrides=["rollout.max_tokens=48", "control.token=secret", "control.start_paused=true"]
    )
    assert cfg.algorithm.length_norm == 48 and cfg.eval.max_tokens == 48
    write_config(tmp_path, cfg)
    assert "secret" not in (tmp_path / "config.yaml").read_text()
    # Started paused, this launch only: a resumed launch runs unless asked again.
    assert load_config(tmp_path / "config.yaml").control.start_paused is False
    # `duet train --resume` loads RUN_DIR/config.yaml (overrides may follow): the same values come back,
    # even when an override changes the field they were derived from.
    again = load_config(tmp_path / "config.yaml")
    assert again.model_dump(exclude={"control"}) == cfg.model_dump(exclude={"control"})
    changed = load_config(tmp_path / "config.yaml", ["rollout.max_tokens=96"])
    assert (changed.algorithm.length_norm, changed.eval.max_tokens) == (48, 48)
    # A value the user set is theirs.
    own = load_config(overrides=["algorithm.length_norm=7", "eval.max_tokens=9"])
    assert (own.algorithm.length_norm, own.eval.max_tokens) == (7, 9)


@pytest.mark.parametrize(
    "overrides, stage",
    [
        ([], 0),  # one rank, float32: nothing to partition
        (["learner.num_ranks=2"], 2),
        (["model.dtype=bfloat16"], 2),  # one rank, but float32 sums of bf16 gradients need ZeRO
        (["model.dtype=bfloat16", "learner.grad_accum_dtype=model"], 0),
        (["learner.num_ranks=4", "learner.zero_stage=3"], 3),  # a stage the user set is theirs
        (["learner.zero_stage=1"], 1),
    ],
)
def test_zero_stage_defaults_to_what_the_rank_count_needs(tmp_path, overrides, stage):
    cfg = load_config(overrides=overrides)
    assert cfg.learner.zero_stage == stage
    write_config(tmp_path, cfg)  # as a number: a resume keeps it even when the rank count changes
    assert load_config(tmp_path / "config.yaml", ["learner.num_ranks=3"]).learner.zero_stage == stage


def test_overrides_leave_the_presets_as_they_are():
    before = json.dumps(PRESETS, sort_keys=True)
    cfg = load_config(preset="2-grpo", overrides=["algorithm.clip_low=0.1", "rollout.group_size=4"])
    assert (cfg.algorithm.clip_low, cfg.rollout.group_size) == (0.1, 4)
    assert json.dumps(PRESETS, sort_keys=True) == before
    assert load_config(preset="2-grpo").algorithm.clip_low == 0.2


def test_sampling_is_one_model_for_rollout_and_eval():
    cfg = load_config(overrides=["rollout.temperature=0.9", "eval.top_k=5", "rollout.max_tokens=32"])
    assert cfg.rollout.sampling() == SamplingConfig(temperature=0.9, top_p=1.0, top_k=-1, max_tokens=32)
    assert cfg.eval.sampling() == SamplingConfig(temperature=0.7, top_p=0.8, top_k=5, max_tokens=32)


def test_model_check_names_the_field(tmp_path, tiny_model):
    check_model(load_config())  # the embedded tiny model: nothing to check
    check_model(load_config(overrides=[f"model.path={tiny_model}", "model.cache_dir=x"]))
    check_model(load_config(overrides=["model.path=Qwen/Qwen2.5-Math-1.5B"]))  # a hub id
    with pytest.raises(ConfigError, match=r"model\.path: .* no config\.json"):
        check_model(load_config(overrides=[f"model.path={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"model\.path: .* not a folder"):
        check_model(load_config(overrides=[f"model.path={tmp_path / 'missing'}"]))


class FolderLearner:
    """Stands in for LearnerGroup's checkpoint calls: writes the folders it is asked to."""

    def save_checkpoint(self, directory: str, tag: str, state: dict) -> None:
        (Path(directory) / tag).mkdir(parents=True)
        (Path(directory) / tag / "state.json").write_text(json.dumps(state))

    def export_hf(self, directory: str, tokenizer_from: str) -> None:
        Path(directory).mkdir(parents=True)

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        return json.loads((Path(directory) / tag / "state.json").read_text())


def test_checkpoints_whole_newest_pruned(tmp_path):
    learner = FolderLearner()
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path, step, {"step": step}, learner, keep=2, export_from="model" if step == 3 else None
        )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]
    assert (tmp_path / "checkpoints" / "step_000003" / "hf").is_dir()
    assert not (tmp_path / "checkpoints" / "step_000002" / "hf").exists()
    (tmp_path / "checkpoints" / ".tmp-step_000004").mkdir()  # a write that never finished
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000003" and load_checkpoint(latest, learner) == {"step": 3}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    truncate_metrics(tmp_path, 3)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_control_requests_are_applied_between_steps():
    control = RunControl("runs/x")
    with pytest.raises(ValueError, match="engines"):
        control.scale(0)
    assert control.scale(2)["accepted"] and control.checkpoint()["accepted"]
    scaled: list[int] = []
    events = control.apply(scaled.append, lambda: "ckpt/step_000001")
    assert scaled == [2] and [e["event"] for e in events] == ["checkpoint"]
    assert events[0]["path"] == "ckpt/step_000001"
    assert control.apply(scaled.append, lambda: "x") == []  # nothing queued: returns at once
    control.publish(1, 3, 1, {0: 1}, {"step": 1, "reward/mean": 0.5, "queue": {"depth": 2}, "events": []})
    assert control.status() == {
        "state": "running",
        "step": 1,
        "steps": 3,
        "policy_version": 1,
        "engines": [{"id": 0, "version": 1}],
        "queue_depth": 2,
        "last_metrics": {"step": 1, "reward/mean": 0.5},
        "run_dir": "runs/x",
        "paused": False,
    }
    # Paused: the loop waits in apply until resumed.
    control.pause()
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (control.apply(scaled.append, lambda: "x"), done.set()))
    waiter.start()
    time.sleep(0.5)
    assert not done.is_set() and control.status()["paused"] and control.status()["state"] == "paused"
    control.resume()
    waiter.join(timeout=5)
    assert done.is_set() and control.status()["state"] == "running"
    # control.start_paused: the first apply, before step 1, already waits.
    held = RunControl("runs/x", paused=True)
    waiter = threading.Thread(target=held.apply, args=(scaled.append, lambda: "x"), daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and held.status()["state"] == "paused"
    held.resume()
    waiter.join(timeout=5)
    assert not waiter.is_alive()


def test_resume_for_some_steps_pauses_again_after_them():
    """POST /resume {"steps": N}: the loop runs N more steps, then holds at the next point between steps."""
    control, noop = RunControl("runs/x", paused=True), (lambda *_: None)
    assert control.resume(steps=2) == {"accepted": True, "paused": False, "steps_before_pause": 2}
    assert control.status()["steps_before_pause"] == 2
    for step in (1, 2):
        assert control.apply(noop, noop) == []  # not held: the step runs
        control.publish(step, 5, step, {0: step}, {"step": step})
    assert control.status()["paused"] and "steps_before_pause" not in control.status()
    waiter = threading.Thread(target=control.apply, args=(noop, noop), daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and control.status()["state"] == "paused" and control.status()["step"] == 2
    control.resume()  # a plain resume runs on with no count
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    control.publish(3, 5, 3, {0: 3}, {"step": 3})
    assert not control.status()["paused"]
    control.resume(steps=3)
    control.pause()  # a pause now drops the count
    assert "steps_before_pause" not in control.status()
    control.resume()
    control.publish(4, 5, 4, {0: 4}, {"step": 4})
    assert not control.status()["paused"]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        control.resume(steps=0)

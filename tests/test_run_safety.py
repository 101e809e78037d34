"""Nothing lost, nothing silent (issue 11), without actors: one run per folder, checkpoint order and
durability, metrics and timeline files that survive a crash, TensorBoard after a resume, bad input named
by field or row, the control API's engine bound, the progress line of unchecked steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.checkpoints import latest_checkpoint, save_checkpoint, truncate_metrics
from cluster.cli import main
from cluster.control import RunControl
from cluster.driver import Trainer
from cluster.metrics import MetricsWriter
from cluster.reporting import progress_line
from cluster.runtime import write_timeline
from tests.test_runtime import FolderLearner


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`duet ...` in-process: (exit code, stderr). A traceback is a failure, whatever the exit code."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception as e:  # the bug this file is about: an error that escapes as a traceback
        pytest.fail(f"duet {' '.join(argv)} raised {type(e).__name__}: {e}")
    return rc, capsys.readouterr().err


# ---- finding 1: a run directory holds one run ----
@pytest.fixture
def no_actors(monkeypatch):
    """A run that gets as far as starting actors fails the test at once (and starts nothing)."""

    def refuse(self):
        raise AssertionError(f"actors were started in {self.run_dir}")

    monkeypatch.setattr(Trainer, "start", refuse)


def _old_run(folder: Path) -> None:
    (folder / "checkpoints" / "step_000080").mkdir(parents=True)
    (folder / "checkpoints" / "step_000080" / "driver_state.json").write_text("{}")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")


def test_reused_run_dir_is_refused_before_any_actor(capsys, tmp_path, no_actors):
    import ray

    _old_run(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    rc, err = run_cli(capsys, "train", "--run-dir", str(tmp_path), "train.steps=1")
    assert rc == 2 and "already holds a run" in err and f"--resume {tmp_path}" in err
    assert (tmp_path / "metrics.jsonl").read_text() == before and not ray.is_initialized()


def test_run_dir_from_yaml_is_refused_too(capsys, tmp_path, no_actors):
    _old_run(tmp_path / "run")
    config = tmp_path / "c.yaml"
    config.write_text(f"run:\n  run_dir: {tmp_path / 'run'}\ntrain:\n  steps: 1\n")
    rc, err = run_cli(capsys, "train", "--config", str(config))
    assert rc == 2 and "already holds a run" in err and "--resume" in err


def test_trainer_refuses_a_used_folder(tmp_path):
    from cluster.config import ConfigError, load_config

    _old_run(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(load_config(overrides=["train.steps=1"]), tmp_path)


def test_resume_at_another_zero_stage_is_refused_naming_both(capsys, tmp_path, no_actors):
    """Issue 24: each ZeRO stage lays out DeepSpeed's optimizer state its own way; a resume that changes the
    stage is refused before any actor starts, and the run's config.yaml is left as it was."""
    from cluster.config import load_config
    from cluster.runtime import write_config

    _old_run(tmp_path)
    write_config(tmp_path, load_config(overrides=["train.steps=1"]))  # one rank, float32: ZeRO-0
    state = {"step": 80, "learner": {"zero_stage": 0, "num_ranks": 1}}
    (tmp_path / "checkpoints" / "step_000080" / "driver_state.json").write_text(json.dumps(state))
    before = (tmp_path / "config.yaml").read_text()
    assert "zero_stage: 0" in before
    rc, err = run_cli(capsys, "train", "--resume", str(tmp_path), "learner.zero_stage=2")
    assert rc == 2, err
    assert "written at learner.zero_stage=0" in err and "asks for learner.zero_stage=2" in err, err
    assert "Resume with learner.zero_stage=0" in err
    assert (tmp_path / "config.yaml").read_text() == before


def test_pruning_keeps_the_newest_steps_by_number(tmp_path):
    learner = FolderLearner()
    for step in (999_999, 1_000_000, 1_000_001):  # step_1000000 sorts before step_999999 by name
        save_checkpoint(tmp_path, step, {"step": step}, learner, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_1000000", "step_1000001"]
    assert latest_checkpoint(tmp_path).name == "step_1000001"


# ---- finding 8: crash safety of the files a run writes ----
def test_checkpoint_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    final = save_checkpoint(tmp_path, 3, {"step": 3}, FolderLearner(), keep=2, export_from="model")
    tmp = str(tmp_path / "checkpoints" / ".tmp-step_000003")
    files = [str(p).replace(str(final), tmp) for p in final.rglob("*") if p.is_file()]
    assert files and all(f in synced for f in files), (files, synced)  # contents, under the temporary name
    assert tmp in synced  # and the temporary folder's entries
    assert synced[-1] == str(tmp_path / "checkpoints")  # then the rename itself


def test_truncate_metrics_drops_a_half_written_row_and_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "x"')
    inode = path.stat().st_ino
    try:
        truncate_metrics(tmp_path, 4)
    except ValueError as e:
        pytest.fail(f"truncate_metrics failed on a half-written last line: {e}")
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert path.stat().st_ino != inode, "rewritten in place: a crash meanwhile would lose the rows"
    assert not list(tmp_path.glob(".metrics*"))


def test_timeline_is_appended_on_resume(tmp_path):
    write_timeline(tmp_path, [{"component": "learner", "start": 1.0, "end": 2.0}])
    write_timeline(tmp_path, [{"component": "learner", "start": 3.0, "end": 4.0}])  # the resumed run's
    starts = [json.loads(x)["start"] for x in (tmp_path / "timeline.jsonl").read_text().splitlines()]
    assert starts == [1.0, 3.0]


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_events_after_the_checkpoint_are_superseded(tmp_path):
    first = MetricsWriter(tmp_path)
    for step in range(1, 6):  # the run that crashed after step 5; its checkpoint is step 3
        first.write({"step": step, "reward/mean": 0.1 * step})
    first.close()
    truncate_metrics(tmp_path, 3)
    again = MetricsWriter(tmp_path, purge_step=4)
    for step in (4, 5):
        again.write({"step": step, "reward/mean": 1.0 + step})
    again.close()
    got = tensorboard_scalars(tmp_path, "reward/mean")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]
    assert [round(v, 4) for _, v in got] == [0.1, 0.2, 0.3, 5.0, 6.0]


# ---- finding 9: the control API's engine bound, the progress line ----
def test_scale_has_an_upper_bound():
    control = RunControl("runs/x")
    with pytest.raises(ValueError, match=r"rollout\.max_engines"):
        control.scale(100_000)  # a typo: placement would wait forever for these
    control.max_engines = 3  # what the driver sets from the config or the cluster's resources
    assert control.scale(3)["accepted"]
    with pytest.raises(ValueError, match=r"engines=4 .*\(3"):
        control.scale(4)


def test_progress_line_says_unchecked_when_sync_was_not_checked():
    m = {
        "step": 2,
        "policy_version": 2,
        "reward/mean": 0.5,
        "groups/with_signal": 1,
        "groups/total": 2,
        "time/generate_s": 1.0,
        "time/train_s": 1.0,
        "time/broadcast_s": 0.1,
    }
    assert progress_line({**m, "sync/checksum_match": None}, 4).endswith("sync unchecked")
    assert progress_line(m, 4).endswith("sync unchecked")
    assert progress_line({**m, "sync/checksum_match": True}, 4).endswith("sync ok")
    assert progress_line({**m, "sync/checksum_match": False}, 4).endswith("sync MISMATCH")


def test_progress_line_shows_what_moves_not_the_on_policy_loss():
    """Issue 22, item 15: on-policy with one update per batch the clipped surrogate's value is zero by
    construction, so `loss +0.0000` on every step read as "nothing is learning". The line shows the gradient
    norm and the entropy; the clip fraction when it can be non-zero (several updates per batch) and the KL
    when there is a reference."""
    m = {
        "step": 3, "policy_version": 3, "reward/mean": 0.5, "groups/with_signal": 6, "groups/total": 8,
        "time/generate_s": 1.0, "time/train_s": 1.0, "time/broadcast_s": 0.1, "sync/checksum_match": True,
        "train/loss": 0.0, "train/grad_norm": 0.8125, "train/entropy": 1.25, "train/clip_frac/total": 0.0,
    }  # fmt: skip
    line = progress_line(m, 10)
    assert "loss" not in line and "|grad| 0.8125" in line and "entropy 1.250" in line, line
    assert "clip" not in line and "kl" not in line, line
    several = progress_line({**m, "train/updates": 4.0, "train/clip_frac/total": 0.0312}, 10)
    assert "clip 3.1%" in several, several
    assert "kl(ref) 0.0020" in progress_line({**m, "train/kl": 0.002}, 10)
    tied = {k: v for k, v in m.items() if not k.startswith("train/")}  # every group tied: no update
    assert "|grad| -" in progress_line(tied, 10)


# ---- finding 6: errors that name the field or the row and say what to do ----
def _dry(capsys, *argv: str) -> str:
    rc, err = run_cli(capsys, "train", "--dry-run", *argv)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, not a traceback
    return lines[0]


@pytest.mark.parametrize(
    "template",
    [
        r"Put the answer in \boxed{}. {problem}",
        "{question}: {problem}",
        "{problem} {0}",
        "{problem",
        "}{problem}",
    ],
)
def test_prompt_template_errors_name_the_field(capsys, template):
    err = _dry(capsys, f"data.prompt_template='{template}'")
    assert "data.prompt_template" in err and ("doubled" in err or "placeholder" in err), err


def test_prompt_template_with_doubled_braces_is_accepted(capsys):
    rc, err = run_cli(capsys, "train", "--dry-run", r"data.prompt_template='{problem} Answer in \boxed{{}}.'")
    assert rc == 0, err


def test_non_utf8_jsonl_names_the_row(capsys, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"problem": "1+1=", "answer": "2"}\n{"problem": "caf\xe9", "answer": "3"}\n')
    err = _dry(capsys, f"data.path={data}")
    assert "data.path" in err and "line 2 of" in err and "UTF-8" in err


def test_broken_parquet_is_named(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"problem": ["1+1="] * 50, "answer": ["2"] * 50}), good)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a copy cut short
    err = _dry(capsys, f"data.path={broken}")
    assert "data.path" in err and "broken.parquet" in err and "Parquet" in err


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("eval.every_steps=50", "eval.every_steps"),  # more than train.steps: never evaluates
        ("eval.path={missing}", "eval.path"),
        ("eval.path={bad_rows}", "line 2 of"),
        ("eval.max_tokens=300", "eval.max_tokens"),  # no room for the prompt in max_model_len 256
        ("eval.samples_per_prompt=0", "eval.samples_per_prompt"),
        ("eval.top_p=2", "eval.top_p"),
    ],
)
def test_bad_eval_settings_name_the_field(capsys, tmp_path, override, field):
    bad_rows = tmp_path / "eval.jsonl"
    bad_rows.write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": "2+2="}\n')
    value = override.format(missing=tmp_path / "missing.jsonl", bad_rows=bad_rows)
    err = _dry(capsys, "train.steps=10", "eval.every_steps=5", value)
    assert field in err, err


def test_each_bad_field_is_one_line(capsys):
    rc, err = run_cli(capsys, "train", "--dry-run", "learner.lr=fast", "rollout.group_sise=4")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 2
    assert any("learner.lr" in x for x in lines) and any("rollout.group_sise" in x for x in lines)

"""The end-to-end loop: `duet train` on the default config, as a user runs it (a real subprocess)."""

from __future__ import annotations

import json

import pytest

from cluster.metrics import read_metrics
from tests.helpers import run_duet

pytestmark = pytest.mark.integration


def test_duet_train_default_three_steps(tmp_path, model_cache, tiny_model):
    run_dir = tmp_path / "run"
    proc = run_duet("train", "--run-dir", str(run_dir), "train.steps=3", f"model.cache_dir={model_cache}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    # the default cadence checks the first broadcast and every 10th; the others log null
    assert [m["sync/checksum_match"] for m in metrics] == [True, None, None]
    assert metrics[0]["sync/engine_versions"] == [1]
    required = [
        "reward/mean",
        "rollouts",
        "groups/with_signal",
        "groups/dropped_tied",
        "tokens/generated",
        "time/generate_s",
        "time/reward_s",
        "time/train_s",
        "time/broadcast_s",
        "train/loss",
        "train/grad_norm",
        "train/logprob_gap",
    ]
    for m in metrics:
        assert not [k for k in required if k not in m]
        assert m["rollouts"] == 2 * 64  # 2-GRPO: every prompt's group is whole
        # identical weights in engine and learner: their log-probs agree (issue 3, claim 7)
        assert m["train/logprob_gap"] < 1e-3
    assert "step   3/3" in proc.stderr  # progress is shown as it goes
    assert (run_dir / "config.yaml").exists()
    final = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert (final / "hf" / "config.json").exists() and (final / "driver_state.json").exists()

    # the exported model is what a user evaluates: `duet eval` loads it as it is
    data = tmp_path / "heldout.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": f"{a}+{b}=", "answer": str(a + b), "source": "add"}) + "\n"
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]
        )
    )
    out = tmp_path / "eval.json"
    proc = run_duet(
        "eval",
        "--model",
        str(final / "hf"),
        "--dataset",
        str(data),
        "--out",
        str(out),
        "eval.samples_per_prompt=4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    overall = json.loads(out.read_text())["overall"]
    assert overall["problems"] == 4 and overall["samples"] == 4 and 0.0 <= overall["avg@n"] <= 1.0

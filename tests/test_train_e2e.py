"""The end-to-end loop: `duet train` on the default config, as a user runs it (a real subprocess)."""

from __future__ import annotations

import json

import pytest
import yaml

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
    # The engine shares the learner's node: its weights come through shared memory (issue 24), and the first
    # (checked) step above proves the bytes it loaded are the learner's.
    assert [(m["sync/shared_memory_engines"], m["sync/network_engines"]) for m in metrics] == [(1, 0)] * 3
    assert all(m["sync/bytes"] > 1 << 20 for m in metrics)
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
    # One rank, float32: no ZeRO partitioning by default (issue 24). The stage is written where a resume reads
    # it, and DeepSpeed's checkpoint is the unpartitioned one (no per-rank optimizer partitions).
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["learner"]["zero_stage"] == 0
    state = json.loads((final / "driver_state.json").read_text())
    assert state["learner"] == {"zero_stage": 0, "num_ranks": 1, "lora_rank": 0, "lora_targets": None}
    written = [p.name for p in (final / "deepspeed").rglob("*.pt")]
    assert written and not [n for n in written if "zero_pp_rank" in n], written

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
